"""Run chart_check.py under the Helm tools' Python from the project's Python (what the chart tests do).

helm-sdkpy needs Python >= 3.12 and the project runs on 3.11, so the Helm work happens in the separate
environment that tests/setup_helm_tools.sh builds, as one subprocess per batch of cases.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART_CHECK = Path(__file__).resolve().parent / "chart_check.py"


class HelmToolsMissing(RuntimeError):
    """The Helm tools' environment does not exist; the message says how to build it."""


def helm_python() -> Path:
    venv = Path(os.environ.get("RAYFLEET_HELM_VENV", REPO / ".venv-helm"))
    python = venv / "bin" / "python"
    if not python.exists():
        raise HelmToolsMissing(
            f"the Helm tools' Python is missing ({python}): run tests/setup_helm_tools.sh "
            "(it builds a Python 3.12 venv with helm-sdkpy and kubernetes-validate), or point "
            "RAYFLEET_HELM_VENV at one"
        )
    return python


def check_cases(cases: dict[str, dict[str, Any]], timeout_s: float = 300) -> dict[str, dict[str, Any]]:
    """chart_check.py's report for each case ({values_files, set_json, chart, release, namespace})."""
    done = subprocess.run(
        [str(helm_python()), str(CHART_CHECK), "--batch"],
        input=json.dumps(cases), capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chart_check.py --batch failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)
