"""Flag reference outputs that make a comparison vacuous: constant, or (nearly) all zeros.

A check passes trivially when the reference output carries no signal on the inputs
used: a detector's probability map on noise is ~0 everywhere (PP-OCR det on synthesized
inputs: max 8.8e-6), so a fusion that changed it by 87x in relative terms still "passes".
Such outputs are named with a suggestion to pass real inputs (``--data``) or inputs that
fit the model (``--shape``, ``--int-range``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["NEAR_ZERO", "ZERO_SHARE", "vacuous_outputs", "vacuous_warning"]

#: a value below this magnitude counts as zero
NEAR_ZERO = 1e-6
#: an output with at least this share of (near-)zero values is flagged
ZERO_SHARE = 0.99


def vacuous_outputs(outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, str]:
    """Return, per float output that is constant or nearly all zeros over every sample, what it is."""
    names = list(outputs[0]) if outputs else []
    found: dict[str, str] = {}
    for name in names:
        arrays = [np.asarray(sample[name]) for sample in outputs if name in sample]
        if not arrays or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
            continue
        values = np.concatenate([a.astype(np.float64).ravel() for a in arrays])
        values = values[np.isfinite(values)]
        if values.size < 2:
            continue
        peak = float(np.abs(values).max())
        zeros = float(np.mean(np.abs(values) < NEAR_ZERO))
        if zeros >= ZERO_SHARE:
            found[name] = f"is (nearly) zero in {zeros:.1%} of its values (max |value| {peak:.3g})"
        elif float(values.max() - values.min()) <= 1e-6 * max(1.0, peak):
            found[name] = f"is constant ({values[0]:.6g}) on every sample"
    return found


def vacuous_warning(name: str, what: str, synthesized: bool) -> str:
    """Return the warning line for one vacuous output."""
    advice = (
        "the inputs were synthesized: pass real inputs with --data, or fit them with --shape/--int-range"
        if synthesized
        else "choose inputs on which it varies"
    )
    return f"reference output {name!r} {what}, so comparing it proves little; {advice}"
