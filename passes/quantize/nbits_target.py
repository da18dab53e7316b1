"""The accuracy target of weight-only low-bit quantization: the fewest sensitive weights sent up that meet it.

A layer sent up is stored at 8 bits or kept in float (``widen(site)`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnxopt.passes.common.budget import HeldOutCheck, search_smallest
from onnxopt.passes.common.stats import InputStats
from onnxopt.passes.quantize.nbits_math import output_error
from onnxopt.passes.quantize.nbits_rewrite import Encoded, Site

__all__ = ["sensitivity", "widen_to_target"]


def sensitivity(site: Site, encoded: Encoded, stats: InputStats | None) -> float:
    """Return a layer's relative rounding error: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, the weight's without ``H``."""
    approx = encoded.quant.dequantize()
    gram = stats.mean_gram[0] if stats is not None and stats.mean_gram is not None else None
    if gram is None or not np.isfinite(gram).all():
        return float(np.sum((site.matrix - approx) ** 2) / max(np.sum(site.matrix**2), 1e-30))
    zero = np.zeros_like(site.matrix)
    return output_error(site.matrix, approx, gram) / max(output_error(site.matrix, zero, gram), 1e-30)


def widen_to_target(
    check: HeldOutCheck,
    candidates: Sequence[Site],
    encoded: dict[str, Encoded],
    layer_stats: Mapping[str, InputStats],
    build: Callable[[dict[str, Encoded]], onnx.ModelProto],
    widen: Callable[[Site], Encoded | None],
    notes: list[str],
    *,
    bits: int,
    target_name: str,
) -> tuple[dict[str, Encoded], int, bool]:
    """Return the encoding meeting ``check`` with the fewest ``candidates`` sent up, that count, and met.

    Candidates are ranked by :func:`sensitivity` per weight on the calibration inputs; the count is
    doubled until the target holds on the held-out samples, then bisected down
    (:func:`search_smallest`). ``bits`` is the width the others keep and ``target_name``
    the target as the notes name it.
    """
    name = target_name
    met, summary = check(build(encoded))
    if met:
        notes.append(f"accuracy target {name} met with every layer at {bits} bits: {summary}")
        return encoded, 0, True
    # error per weight: the target is met with the fewest weights sent up (file and latency grow with weights)
    ranked = sorted(
        candidates, key=lambda s: sensitivity(s, encoded[s.key], layer_stats.get(s.key)) / max(s.matrix.size, 1)
    )[::-1]
    cache: dict[int, tuple[bool, str, dict[str, Encoded]]] = {}

    def attempt(count: int) -> bool:
        if count not in cache:
            wide = dict(encoded)
            for site in ranked[:count]:
                entry = widen(site)
                if entry is None:  # kept in float: the rewrite leaves a site without an entry alone
                    del wide[site.key]
                else:
                    wide[site.key] = entry
            ok, text = check(build(wide))
            cache[count] = (ok, text, wide)
        return cache[count][0]

    low, high = 0, 1
    while high < len(ranked) and not attempt(high):
        low, high = high, min(2 * high, len(ranked))
    if not ranked or not attempt(high):
        notes.append(
            f"accuracy target {name} not met even with {high} layer(s) sent up "
            f"({cache[high][1] if high in cache else summary}); kept the float model"
        )
        return encoded, high, False
    best = search_smallest(attempt, low, high)
    _met, text, wide = cache[best]
    shown = ", ".join(s.key for s in ranked[:best][:6]) + (" and more" if best > 6 else "")
    notes.append(
        f"accuracy target {name}: {summary} with every layer at {bits} bits; met with {best} "
        f"most sensitive layer(s) sent up ({text}): {shown}"
    )
    return wide, best, True
