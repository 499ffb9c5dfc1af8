"""vdsmconn: keeps a virtualization host connected to its storage."""

__version__ = "0.1.0"
