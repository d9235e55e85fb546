#!/usr/bin/env bash
# Set up everything (Debian packages, .venv) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
