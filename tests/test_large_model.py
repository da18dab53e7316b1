"""A model over the 2 GB protobuf limit: optimized and checked in far less memory than its weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import load_model, model_stats

pytestmark = pytest.mark.slow

ROWS, WIDTH = 2 * 1024 * 64, 2048  # two 1 GiB float32 tables: 2 GiB of weights
REPO = Path(__file__).resolve().parents[1]


def _write_big_model(folder: Path) -> Path:
    """Write the model's data file table by table in 64 MiB pieces, never holding a table."""
    data_name = "big.onnx.data"
    tensors = []
    with open(folder / data_name, "wb") as data:
        for i in range(2):
            offset = data.tell()
            step = 8192
            for start in range(0, ROWS, step):
                block = np.full((step, WIDTH), i + 1, dtype=np.float32)
                block[:, 0] = np.arange(start, start + step, dtype=np.float32) * (i + 1)
                data.write(block.tobytes())
            tensor = TensorProto(name=f"table{i}", data_type=TensorProto.FLOAT, dims=[ROWS, WIDTH])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", ROWS * WIDTH * 4)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensors.append(tensor)
    nodes = [
        helper.make_node("Gather", ["table0", "ids"], ["a"]),
        helper.make_node("Gather", ["table1", "ids"], ["b"]),
        helper.make_node("Identity", ["a"], ["a2"]),
        helper.make_node("Add", ["a2", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _peak_rss(args: list[str]) -> int:
    """Run ``python -m onnxopt ARGS`` in a child; return its peak resident memory in bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", *args], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, args
    return usage.ru_maxrss * 1024


def test_model_over_2gb_is_optimized_lazily_and_checked(tmp_path):
    path = _write_big_model(tmp_path)
    weights = 2 * ROWS * WIDTH * 4
    assert model_stats(load_model(path)).bytes > 2**31  # the weights count, though they stay in the file
    out = tmp_path / "out" / "big.onnx"
    peak = _peak_rss(["optimize", str(path), "-o", str(out), "--pipeline", "fuse", "-q"])
    assert peak < 0.25 * weights, f"fuse peaked at {peak / 2**30:.2f} GiB for 2 GiB of weights"
    assert (tmp_path / "out" / "big.onnx.data").stat().st_size >= weights
    assert "Identity" not in [n.op_type for n in load_model(out).graph.node]
    data = [{"ids": np.array([0, 5, ROWS - 1], np.int64)}]
    # As `onnxopt check` does: onnxruntime reads both files and their external data itself.
    report = check(path, out, Dataset(data), levels=("disabled",))
    assert report.passed, report.failures()
