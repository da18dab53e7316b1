"""A model over the 2 GB protobuf limit: saved with external data, loaded, run and optimized."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import Dataset
from onnxopt.harness import check
from onnxopt.model import PROTOBUF_LIMIT, load_model, model_stats, save_model
from onnxopt.pipeline import PassManager

pytestmark = pytest.mark.slow


def test_model_over_2gb_roundtrips_with_external_data(tmp_path):
    rows, width = 2 * 1024 * 64, 2048  # two 1 GiB float32 tables: 2 GiB of weights
    tables = [np.full((rows, width), i + 1, dtype=np.float32) for i in range(2)]
    for i, table in enumerate(tables):
        table[:, 0] = np.arange(rows, dtype=np.float32) * (i + 1)
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
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(t, f"table{i}") for i, t in enumerate(tables)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del tables
    assert model_stats(model).bytes > PROTOBUF_LIMIT
    path = save_model(model, tmp_path / "big.onnx")
    del model  # keep the peak memory of this test within a small machine
    assert (tmp_path / "big.onnx.data").stat().st_size >= 2 * rows * width * 4
    assert path.stat().st_size < 1_000_000
    result = PassManager([]).run(load_model(path))  # normalize + a pipeline run on > 2 GB
    out = save_model(result.model, tmp_path / "out" / "big.onnx")
    del result
    data = [{"ids": np.array([0, 5, rows - 1], np.int64)}]
    # As `onnxopt check` does: onnxruntime reads both files and their external data itself.
    report = check(path, out, Dataset(data), levels=("disabled",))
    assert report.passed, report.failures()
