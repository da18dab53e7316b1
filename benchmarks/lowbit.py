"""Weight-only low-bit quantization, side by side with onnxruntime's ``matmul_nbits_quantizer``.

``python -m benchmarks.lowbit [--only encoder,decoder,latency]``: in one run, on

* the MiniLM sentence encoder (real sentences; 32 calibration, 16 held out): pooled
  embedding cosine against the float model, file size and single-thread latency as ratios
  to the float model (latency: interleaved runs, median);
* the byte-level decoder trained here (``benchmarks.decoder``; 32 training windows for
  calibration, 16 held-out windows of 128 bytes): perplexity and its increase;
* the ~0.5 B random-weight Llama-style decoder: latency of one ``[1, 1]`` token (no KV
  cache), file size, as ratios to fp32,

for ``onnxopt optimize --pipeline int4`` (variants via ``--param``) and onnxruntime's
quantizer with RTN, GPTQ and HQQ, all at 4 bits, block 32, with zero points. Rows land in
``benchmarks/results/lowbit-<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.common import interleaved_latency, session

__all__ = ["main", "onnxopt_int4", "onnxruntime_int4"]

BLOCK = 32
HERE = Path(__file__).resolve().parent
Feed = dict[str, np.ndarray]


def onnxopt_int4(source: Path, target: Path, calib: Sequence[Feed] | None, params: Sequence[str] = ()) -> float:
    """Run ``onnxopt optimize SOURCE -o TARGET --pipeline int4 [--calib] [--param ...]``; return seconds."""
    command = [sys.executable, "-m", "onnxopt.cli", "optimize", str(source), "-o", str(target), "-p", "int4", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        if calib:
            path = Path(tmp) / "calib.npz"
            np.savez(path, **{name: np.stack([f[name] for f in calib]) for name in calib[0]})
            command += ["--calib", str(path)]
        for param in params:
            command += ["--param", param] if not param.startswith("--") else param.split(" ", 1)
        started = time.perf_counter()
        subprocess.run(command, check=True)
    return time.perf_counter() - started


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds (deep-copyable)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> Feed | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self) -> Any:
        return iter(self.feeds)

    def rewind(self) -> None:
        self.position = 0


def onnxruntime_int4(source: Path, target: Path, algorithm: str, calib: Sequence[Feed] | None) -> float:
    """Quantize with ``matmul_nbits_quantizer`` (``rtn``, ``gptq`` or ``hqq``, 4 bits, block 32); return seconds."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    started = time.perf_counter()
    config: Any
    if algorithm == "rtn":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False)
    elif algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4)
    else:
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib or []))
    quantizer = mnq.MatMulNBitsQuantizer(
        onnx.load(str(source)), block_size=BLOCK, is_symmetric=False, algo_config=config
    )
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))
    return time.perf_counter() - started


def _size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _with_accuracy_level(path: Path, level: int) -> Path:
    """Return a copy of a MatMulNBits model with ``accuracy_level`` set to ``level`` (same weights)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    target = path.with_name(f"{path.stem}-level{level}.onnx")
    onnx.save(model, str(target))
    return target


def _pooled_cosine(reference: Path, candidate: Path, feeds: Sequence[Feed]) -> float:
    ref, cand = session(reference), session(candidate)
    values = []
    for feed in feeds:
        a = ref.run(["sentence_embedding"], feed)[0].ravel()
        b = cand.run(["sentence_embedding"], feed)[0].ravel()
        values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return float(np.mean(values))


def _variants(
    source: Path, calib: Sequence[Feed], tmp: Path, ours: dict[str, Sequence[str]], theirs: Sequence[str]
) -> dict[str, tuple[Path, float]]:
    """Return label -> (quantized model, seconds) for our variants and onnxruntime's algorithms."""
    made: dict[str, tuple[Path, float]] = {}
    for label, params in ours.items():
        path = tmp / f"ours-{label}.onnx"
        # the data-free methods run without data unless the variant asks for it ("--calib")
        data_free = any(p in ("method=hqq", "method=rtn") for p in params) and "--calib" not in params
        chosen = [p for p in params if p != "--calib"]
        made[f"onnxopt {label}"] = (path, onnxopt_int4(source, path, None if data_free else calib, chosen))
    for algorithm in theirs:
        path = tmp / f"ort-{algorithm}.onnx"
        made[f"onnxruntime {algorithm}"] = (path, onnxruntime_int4(source, path, algorithm, calib))
    return made


def _rows(
    source: Path,
    made: dict[str, tuple[Path, float]],
    metric: Callable[[Path], float],
    latency_feed: Feed,
    model: str,
    metric_name: str,
) -> list[dict[str, Any]]:
    base = metric(source)
    names = list(made)
    timings = interleaved_latency([source] + [made[n][0] for n in names], latency_feed, rounds=20)
    rows = [{"model": model, "variant": "float", metric_name: base, "size_ratio": 1.0, "latency_ratio": 1.0}]
    for name, seconds in zip(names, timings[1:], strict=True):
        path, took = made[name]
        rows.append(
            {
                "model": model,
                "variant": name,
                metric_name: metric(path),
                "size_ratio": _size(path) / _size(source),
                "latency_ratio": seconds / timings[0],
                "seconds": round(took, 1),
            }
        )
    return rows


def run_encoder(tmp: Path, extra: bool = False) -> list[dict[str, Any]]:
    """Return the encoder rows: pooled cosine on 16 held-out sentences, size and latency ratios."""
    from benchmarks.encoder import encoder_model_path
    from benchmarks.inputs import encoder_inputs

    source = encoder_model_path()
    feeds = encoder_inputs(48)
    calib, held = feeds[:32], feeds[32:]
    ours = {
        "default (gptq, awq, task target, 8-bit widening)": [],
        "target cosine>=0.99": ["--target cosine>=0.99@sentence_embedding"],
        "target cosine>=0.99, widened float": ["--target cosine>=0.99@sentence_embedding", "widen_bits=0"],
        "gptq awq, no target": ["target=none"],
        "gptq, no awq, no target": ["target=none", "awq=false"],
        "rtn (no data)": ["method=rtn"],
    }
    if extra:  # the data-free HQQ and the accuracy_level=0 copy of the default: ~5 min more
        ours["hqq (no data)"] = ["method=hqq"]
    made = _variants(source, calib, tmp, ours, ["rtn", "gptq", "hqq"])
    if extra:
        default = made["onnxopt default (gptq, awq, task target, 8-bit widening)"]
        made["onnxopt default level0"] = (_with_accuracy_level(default[0], 0), default[1])
    return _rows(source, made, lambda p: _pooled_cosine(source, p, held), held[0], "MiniLM encoder", "cosine")


def run_decoder(tmp: Path) -> list[dict[str, Any]]:
    """Return the trained byte-level decoder rows: held-out perplexity, size and latency ratios."""
    from benchmarks.decoder import corpus, heldout_windows, perplexity, trained_decoder_path

    source = trained_decoder_path()
    train = np.frombuffer(corpus()[0], dtype=np.uint8).astype(np.int64)
    starts = np.random.default_rng(0).choice(len(train) - 128, size=32, replace=False)
    calib = [{"input_ids": train[s : s + 128][None]} for s in starts]
    windows = heldout_windows(16)
    ours = {
        "gptq": [],
        "gptq lowrank5%": ["lowrank=0.05"],
        "gptq lm_head4": ["lm_head_bits=4"],
        "hqq (no data)": ["method=hqq"],
        "rtn (no data)": ["method=rtn"],
    }
    made = _variants(source, calib, tmp, ours, ["rtn", "gptq", "hqq"])
    made["onnxopt gptq level0"] = (_with_accuracy_level(made["onnxopt gptq"][0], 0), made["onnxopt gptq"][1])
    rows = _rows(
        source, made, lambda p: perplexity(session(p), windows), {"input_ids": windows[0][None]}, "byte decoder", "ppl"
    )
    for row in rows:
        row["ppl_increase"] = row["ppl"] / rows[0]["ppl"] - 1
    return rows


def run_latency(tmp: Path) -> list[dict[str, Any]]:
    """Return the 0.5 B random decoder rows: [1, 1] token latency and size ratios (random weights: no accuracy).

    Our pass runs on the exported graph through the Python API with ``method=rtn`` (the
    CLI's fuse stage and HQQ on 0.5 B weights take tens of minutes on a shared 2-core
    machine); the ``accuracy_level=0`` row is the same weights with the attribute changed.
    """
    from benchmarks.decoder import random_decoder_path
    from onnxopt.pipeline import Context, create_pass

    source = random_decoder_path()
    started = time.perf_counter()
    result = create_pass("quantize_weights", method="rtn")(onnx.load(str(source)), Context())
    ours = tmp / "ours-rtn.onnx"
    onnx.save(result.model, str(ours))
    del result
    made = {"onnxopt rtn": (ours, time.perf_counter() - started)}
    made["onnxopt rtn level0"] = (_with_accuracy_level(ours, 0), made["onnxopt rtn"][1])
    theirs = tmp / "ort-rtn.onnx"
    made["onnxruntime rtn"] = (theirs, onnxruntime_int4(source, theirs, "rtn", None))
    feed = {"input_ids": np.array([[42]], dtype=np.int64)}
    return _rows(source, made, lambda p: float("nan"), feed, "random Llama 0.5B", "none")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen parts; each writes ``benchmarks/results/lowbit-<part>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="encoder,decoder,latency")
    parser.add_argument("--extra", action="store_true", help="also the encoder with HQQ and accuracy_level=0")
    args = parser.parse_args(argv)
    parts: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
        "encoder": lambda tmp: run_encoder(tmp, args.extra),
        "decoder": run_decoder,
        "latency": run_latency,
    }
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows = parts[name](Path(tmp))
        (HERE / "results" / f"lowbit-{name}.json").write_text(json.dumps(rows, indent=1))
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
