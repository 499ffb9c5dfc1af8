#!/usr/bin/env bash
# Install vdsmconn into .venv and run the daemon on the embedded default: state, socket and
# mount root under ./local, no configuration file needed. Ctrl-C stops it (mounts stay).
# setup-env.sh installs every backend's host tools and Python libraries: `vdsmconn info`
# shows each backend available unless this machine's kernel lacks its part.
set -euo pipefail
. "$(dirname "$0")/setup-env.sh"
echo "socket: $PWD/local/run/vdsmconn.sock   client: .venv/bin/vdsmconn --socket $PWD/local/run/vdsmconn.sock list" >&2
exec .venv/bin/vdsmconnd --local ./local
