#!/usr/bin/env bash
# Builds the Python environment the Helm chart tests call as a subprocess (tests/test_helm*.py):
#   helm-sdkpy          Helm v4's Go library with Python bindings (lint, install-render); needs Python >= 3.12
#   kubernetes-validate the Kubernetes OpenAPI schemas, for strict validation of rendered objects
# Idempotent: an existing environment that imports both and loads Helm's library is left as it is.
#
#   tests/setup_helm_tools.sh            # -> $RAYFLEET_HELM_VENV, default <repo>/.venv-helm
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RAYFLEET_HELM_VENV:-$REPO/.venv-helm}"
HELM_SDKPY="helm-sdkpy==0.1.32"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"

ready() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, helm_sdkpy, kubernetes_validate
helm_sdkpy.get_version()  # loads the Go shared library
assert m.version("helm-sdkpy") == "0.1.32" and m.version("kubernetes-validate") == "1.37.0"
PY
}

# Like Python 3.13's venv: git ignores the environment from inside, whatever the repository's .gitignore says.
ignore_self() { printf '# created by tests/setup_helm_tools.sh\n*\n' > "$VENV/.gitignore"; }

if ready; then
  ignore_self
  echo "helm tools ready: $VENV"
  exit 0
fi

PYTHON=""
for candidate in "${RAYFLEET_HELM_PYTHON:-}" /root/.pyenv/versions/3.12.1/bin/python python3.12 python3.13; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 \
     && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    PYTHON="$(command -v "$candidate")"
    break
  fi
done
if [ -z "$PYTHON" ]; then
  echo "setup_helm_tools: no Python >= 3.12 found (helm-sdkpy needs it); set RAYFLEET_HELM_PYTHON" >&2
  exit 1
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
ignore_self
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$HELM_SDKPY" "$KUBERNETES_VALIDATE" pyyaml jsonschema
if ! ready; then
  echo "setup_helm_tools: $VENV was built but cannot load Helm's library" >&2
  exit 1
fi
echo "helm tools ready: $VENV ($("$VENV/bin/python" -c 'import helm_sdkpy; print(helm_sdkpy.get_version())'))"
