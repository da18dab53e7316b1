"""Decoder language models for the low-bit benchmarks: one trained here, one random and large.

* :func:`trained_decoder_path`: a small byte-level Llama-style decoder (``transformers``
  ``LlamaConfig``, 4 layers, hidden 256) trained offline with torch on the English
  documentation text that ships with Python (``pydoc_data.topics``), exported to ONNX with
  the input ``input_ids`` ``[1, T]`` (int64) and the output ``logits`` ``[1, T, 256]``. The
  last tenth of the text (by topic) is held out: :func:`heldout_windows` and
  :func:`perplexity` measure the task metric on it.
* :func:`random_decoder_path`: a ~0.5 B parameter Llama-style decoder with random weights
  (nothing downloaded), for decode-shaped latency: a ``[1, 1]`` token without KV cache.

Both are cached under ``~/.cache/onnxopt/models``. Training and export need ``torch`` and
``transformers`` (benchmark-only; neither is a runtime dependency of onnxopt).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import cache_dir

__all__ = [
    "DECODER_VERSION",
    "corpus",
    "heldout_windows",
    "perplexity",
    "random_decoder_path",
    "trained_decoder_path",
]

log = logging.getLogger(__name__)

DECODER_VERSION = "bytes-llama-l4-h256-v1"
"""Cache key of the trained decoder; bump it when training or export changes."""

_SEQ = 128
_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_BIG_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def corpus() -> tuple[bytes, bytes]:
    """Return (training bytes, held-out bytes): Python's topic docs, the last tenth of topics held out."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    cut = int(len(keys) * 0.9)
    train = "\n".join(topics.topics[k] for k in keys[:cut]).encode("utf-8")
    held = "\n".join(topics.topics[k] for k in keys[cut:]).encode("utf-8")
    return train, held


def heldout_windows(count: int = 32, length: int = _SEQ) -> np.ndarray:
    """Return ``count`` consecutive non-overlapping byte windows ``[count, length]`` of the held-out text."""
    held = np.frombuffer(corpus()[1], dtype=np.uint8).astype(np.int64)
    usable = min(count, len(held) // length)
    return held[: usable * length].reshape(usable, length)


def perplexity(session: Any, windows: np.ndarray) -> float:
    """Return the byte-level perplexity of an ONNX decoder session on ``windows`` (next-byte NLL)."""
    total, count = 0.0, 0
    for window in windows:
        logits = session.run(["logits"], {"input_ids": window[None]})[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return float(np.exp(total / count))


def _llama(config: dict[str, Any], seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, attn_implementation="eager", use_cache=False)
    return LlamaForCausalLM(cfg)


class _LogitsOnly:
    """Wraps the torch model so the export has one input and one output (built lazily)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any) -> Any:
                # an explicit mask keeps transformers' packed-sequence detection (aten::diff) out of the trace
                mask = torch.ones_like(input_ids)
                return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

        return Wrapper().eval()


def _export(model: Any, target: Path, length: int, external: bool = False) -> None:
    import torch

    wrapper = _LogitsOnly.wrap(model)
    tmp = target.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros((1, length), dtype=torch.int64),),
            str(tmp),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {1: "sequence"}, "logits": {1: "sequence"}},
            opset_version=17,
            dynamo=False,
        )
    import onnx

    proto = onnx.load(str(tmp))
    if external:
        onnx.save(proto, str(target), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save(proto, str(target))
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    tmp.unlink(missing_ok=True)


def _train(steps: int, batch: int, seed: int = 0) -> Any:
    import torch

    torch.set_num_threads(1)
    model = _llama(_CONFIG, seed)
    data = torch.tensor(np.frombuffer(corpus()[0], dtype=np.uint8).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - _SEQ - 1, (batch,), generator=generator)
        x = torch.stack([data[s : s + _SEQ] for s in starts])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            log.info("step %d loss %.3f (%.0f s)", step, float(loss), time.perf_counter() - started)
    return model.eval()


def trained_decoder_path(steps: int = 600, batch: int = 16) -> Path:
    """Return the cached ONNX export of the trained byte-level decoder, training it on first use (~20 min)."""
    target = cache_dir() / "models" / f"decoder-{DECODER_VERSION}.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _export(_train(steps, batch), target, _SEQ)
    return target


def random_decoder_path() -> Path:
    """Return the cached ONNX export of the ~0.5 B random-weight Llama-style decoder (external data)."""
    target = cache_dir() / "models" / "decoder-random-llama-0.5b-v1.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _export(_llama(_BIG_CONFIG, 0).eval(), target, 8, external=True)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = trained_decoder_path()
    import onnxruntime as ort

    print(path, perplexity(ort.InferenceSession(str(path)), heldout_windows()))
