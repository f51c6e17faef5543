"""The least-squares fit of the simulator's `StepTimeModel` to measured engine steps (CPU and GPU calibrations).

`points` holds `prefill` steps (`prefill_tokens`, `seconds`) and `decode` steps (`batch` sequences over `context`
tokens each, `seconds`); the fit is `step_s = base + prefill_token * prefill_tokens + decode_seq * batch +
context_token * batch * context`, coefficients clipped at zero, with its relative errors on the points.
"""

from __future__ import annotations


def fit(points: dict) -> dict:
    import numpy as np

    rows, y = [], []
    for p in points["prefill"]:
        rows.append([1.0, p["prefill_tokens"], 0.0, 0.0])
        y.append(p["seconds"])
    for p in points["decode"]:
        rows.append([1.0, 0.0, p["batch"], p["batch"] * p["context"]])
        y.append(p["seconds"])
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)
    coef = np.maximum(coef, 0.0)
    predicted = np.array(rows) @ coef
    errors = [abs(a - b) / b for a, b in zip(predicted, y)]
    return {"base_s": float(coef[0]), "prefill_token_s": float(coef[1]), "decode_seq_s": float(coef[2]),
            "context_token_s": float(coef[3]), "mean_abs_rel_error": float(np.mean(errors)),
            "max_abs_rel_error": float(np.max(errors))}
