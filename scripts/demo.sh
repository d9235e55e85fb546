#!/usr/bin/env bash
# Set up everything and run the demo: a primary and a secondary on loopback,
# replication, a checkpoint and a failover, on scratch images.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/replfs demo "$@"
