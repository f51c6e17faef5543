#!/usr/bin/env bash
# The quick start: set up (idempotently), then run the demo fleet with a sample workload.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/examples/setup.sh"
cd "$REPO"
export RAYFLEET_DEMO_MODELS="${RAYFLEET_DEMO_MODELS:-$REPO/.demo-models}"
exec "$REPO/.venv/bin/rayfleet" demo "$@"
