"""`python -m vdsmconn` runs the daemon, like `vdsmconnd`."""

import sys

from vdsmconn.daemon import main

sys.exit(main())
