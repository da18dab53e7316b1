"""Pruning of weights: unstructured (``magnitude``, SparseGPT repair) and structured (``channels``).

``sparsegpt`` and ``plan`` are the unstructured math and its per-layer plan
(``paired_stats`` feeds its upstream compensation, ``sparse_storage`` writes the result);
``channel_groups`` finds channels that must go together, ``channel_math`` orders their
removal and re-fits the readers, ``channel_plan`` prices a plan and ``channel_surgery``
applies it.
"""

from __future__ import annotations

from onnxopt.passes.prune.channels import PruneChannels
from onnxopt.passes.prune.magnitude import PruneMagnitude

__all__ = ["PruneChannels", "PruneMagnitude"]
