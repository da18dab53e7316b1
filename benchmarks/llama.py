"""A Llama-style decoder exported from a ``transformers`` config with random weights.

Nothing is downloaded: :class:`transformers.LlamaConfig` describes the architecture,
the weights are drawn from a fixed seed, and the model is exported with torch's
TorchScript exporter (opset 17) without a KV cache, so a ``[1, 1]`` ``input_ids`` is a
decode-shaped single-token run and a longer one a prefill. The export is cached under
``~/.cache/onnxopt/llama/<name>/model.onnx`` with one external data file beside it.

Two sizes: ``large`` has 2.17 GB of fp32 weights (hidden 2048, MLP 5632, 8 layers,
vocabulary 32000, untied lm_head: 542 M parameters), over the 2 GB protobuf limit;
``small`` is a few MB for quick runs. ``python -m benchmarks.llama [large|small]``
exports one.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.models import cache_dir
from onnxopt.model import load_model, save_model

__all__ = ["LLAMA_CONFIGS", "LlamaSpec", "llama_inputs", "llama_model_path"]

log = logging.getLogger(__name__)

OPSET = 17


@dataclass(frozen=True)
class LlamaSpec:
    """Architecture of one benchmark decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    version: str = "v1"


LLAMA_CONFIGS = {
    "large": LlamaSpec(hidden=2048, intermediate=5632, layers=8, heads=32, kv_heads=32, vocab=32000),
    # the same width with half the layers: time against layer count
    "large4": LlamaSpec(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=32, vocab=32000),
    "small": LlamaSpec(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=4, vocab=1000),
}


def llama_inputs(length: int = 1, vocab: int = 32000, seed: int = 0) -> dict[str, np.ndarray]:
    """Return ``input_ids`` of shape ``[1, length]`` (``length=1``: one decode step)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, size=(1, length), dtype=np.int64)}


def _export(spec: LlamaSpec, target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # An all-ones mask keeps transformers off its packed-sequence path (aten::diff).
            mask = torch.ones_like(input_ids)
            return self.inner(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    wrapped = Logits(model)
    example = torch.from_numpy(llama_inputs(8, spec.vocab)["input_ids"])
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        raw = work / "raw.onnx"
        torch.onnx.export(
            wrapped,
            (example,),
            str(raw),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
            do_constant_folding=True,
        )
        del model, wrapped
        gc.collect()
        # The exporter writes one file per tensor for > 2 GB models; gather them into one.
        loaded = load_model(raw)
        staged = work / "out" / target.name
        save_model(loaded, staged, external_data=True)
        del loaded
        for item in staged.parent.iterdir():
            item.replace(target.parent / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def llama_model_path(name: str = "large") -> Path:
    """Return the cached export of the decoder ``name`` (see :data:`LLAMA_CONFIGS`), exporting it once."""
    spec = LLAMA_CONFIGS[name]
    target = cache_dir() / "llama" / f"{name}-{spec.version}" / "model.onnx"
    if not target.is_file():
        _export(spec, target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(f"{llama_model_path(sys.argv[1] if len(sys.argv) > 1 else 'large')}\n")
