#!/usr/bin/env bash
# Install everything the tests need (Debian packages, Python packages) and run them all:
# lint, type check, unit and integration tests against real mounts, and the test guest.
set -euo pipefail
PIP_EXTRAS="[test]"
. "$(dirname "$0")/setup-env.sh"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
