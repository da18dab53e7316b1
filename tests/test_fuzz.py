"""Property-based fuzzing of the CLI (#17): mutated real models never cause exit 3 or leave a file behind.

Each example mutates a real model the way broken exports and damaged downloads look
(drop or duplicate nodes, swap or rename inputs, change dtypes, shapes and attributes,
truncate weights, point external data elsewhere, corrupt bytes) and runs ``inspect``,
``optimize`` (fuse) and ``check`` on it. Whatever happens must be a clean outcome:
exit 0, 1 (a check failed) or 2 (one line naming the problem), never 3 (a bug); and a
command that fails must not leave its output file behind. Examples are derandomized
and bounded so CI runs the same ones in seconds.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from onnxopt.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DTYPES = [onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.INT8, 0, 99]


def _drop_node(model: onnx.ModelProto, i: int, j: int) -> None:
    del model.graph.node[i % len(model.graph.node)]


def _duplicate_node(model: onnx.ModelProto, i: int, j: int) -> None:
    node = onnx.NodeProto()
    node.CopyFrom(model.graph.node[i % len(model.graph.node)])
    model.graph.node.insert(j % (len(model.graph.node) + 1), node)


def _swap_inputs(model: onnx.ModelProto, i: int, j: int) -> None:
    node = model.graph.node[i % len(model.graph.node)]
    if len(node.input) > 1:
        a, b = j % len(node.input), (j + 1) % len(node.input)
        node.input[a], node.input[b] = node.input[b], node.input[a]
    else:
        node.input.append(node.input[0] if node.input else "x")


def _rename_input(model: onnx.ModelProto, i: int, j: int) -> None:
    node = model.graph.node[i % len(model.graph.node)]
    if node.input:
        node.input[j % len(node.input)] = f"nowhere_{j}"


def _change_dtype(model: onnx.ModelProto, i: int, j: int) -> None:
    tensors = list(model.graph.initializer)
    if tensors:
        tensors[i % len(tensors)].data_type = DTYPES[j % len(DTYPES)]


def _change_io_type(model: onnx.ModelProto, i: int, j: int) -> None:
    values = [*model.graph.input, *model.graph.output]
    tensor_type = values[i % len(values)].type.tensor_type
    if j % 2:
        tensor_type.elem_type = DTYPES[j % len(DTYPES)]
    elif tensor_type.shape.dim:
        dim = tensor_type.shape.dim[j % len(tensor_type.shape.dim)]
        dim.dim_value = [0, 7, 10**6][j % 3]


def _change_shape(model: onnx.ModelProto, i: int, j: int) -> None:
    tensors = [t for t in model.graph.initializer if t.dims]
    if tensors:
        tensor = tensors[i % len(tensors)]
        tensor.dims[j % len(tensor.dims)] += 1 + j % 3


def _change_attribute(model: onnx.ModelProto, i: int, j: int) -> None:
    nodes = [n for n in model.graph.node if n.attribute]
    if not nodes:
        return
    attribute = nodes[i % len(nodes)].attribute[j % len(nodes[i % len(nodes)].attribute)]
    if attribute.type == onnx.AttributeProto.INTS and attribute.ints:
        attribute.ints[0] = [-1, 0, 99][j % 3]
    elif attribute.type == onnx.AttributeProto.INT:
        attribute.i = [-1, 0, 99][j % 3]
    elif attribute.type == onnx.AttributeProto.FLOAT:
        attribute.f = [float("nan"), -1.0, 1e30][j % 3]
    else:
        attribute.name = "not_an_attribute"


def _truncate_tensor(model: onnx.ModelProto, i: int, j: int) -> None:
    tensors = [t for t in model.graph.initializer if t.raw_data]
    if tensors:
        tensor = tensors[i % len(tensors)]
        tensor.raw_data = tensor.raw_data[: (j % 4) * len(tensor.raw_data) // 4]


def _external_elsewhere(model: onnx.ModelProto, i: int, j: int) -> None:
    tensors = list(model.graph.initializer)
    if tensors:
        tensor = tensors[i % len(tensors)]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        location = ["../outside.bin", "/etc/hostname", "missing.bin", ""][j % 4]
        for key, value in (("location", location), ("offset", "0"), ("length", "64")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


MUTATIONS = [
    _drop_node,
    _duplicate_node,
    _swap_inputs,
    _rename_input,
    _change_dtype,
    _change_io_type,
    _change_shape,
    _change_attribute,
    _truncate_tensor,
    _external_elsewhere,
]


def _mutated(source: bytes, edits: list[tuple[int, int, int]], corrupt: list[tuple[int, int]]) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(source)
    for which, i, j in edits:
        MUTATIONS[which % len(MUTATIONS)](model, i, j)
    data = bytearray(model.SerializeToString())
    for position, value in corrupt:
        data[position % len(data)] = value
    return bytes(data)


def _run(args: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(args)


def _assert_clean_outcomes(reference: Path, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        mutated = work / "mutated.onnx"
        mutated.write_bytes(data)
        output, report = work / "out.onnx", work / "report.json"
        codes = {
            "inspect": _run(["inspect", str(mutated)]),
            "optimize": _run(["optimize", str(mutated), "-o", str(output), "--report", str(report), "-q"]),
        }
        if codes["optimize"] != 0:
            assert not output.exists() and not report.exists(), "a failed optimize left its output behind"
        check_report = work / "check.json"
        codes["check"] = _run(["check", str(reference), str(mutated), "--report", str(check_report)])
        if codes["check"] == 2:
            assert not check_report.exists(), "a refused check left its report behind"
        assert 3 not in codes.values(), f"internal error (exit 3) in {[c for c, v in codes.items() if v == 3]}"
        assert set(codes.values()) <= {0, 1, 2}, codes
        assert not list(work.glob(".onnxopt-*")), "a staging folder was left behind"


EDITS = st.lists(
    st.tuples(st.integers(0, len(MUTATIONS) - 1), st.integers(0, 10**4), st.integers(0, 10**4)), min_size=1, max_size=3
)
CORRUPT = st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=2)
# No shrinking: a failing example is printed as found (shrinking one took 5 minutes), and CI stays bounded.
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(edits=EDITS, corrupt=CORRUPT)
def test_mutated_digits_model_never_exits_3(edits, corrupt):
    reference = EXAMPLES / "digits.onnx"
    _assert_clean_outcomes(reference, _mutated(reference.read_bytes(), edits, corrupt))


@pytest.mark.real
def test_mutated_real_model_never_exits_3(real_model):
    reference = real_model("silero_vad_half")
    source = reference.read_bytes()

    @settings(FUZZ, max_examples=15)
    @given(edits=EDITS, corrupt=CORRUPT)
    def run(edits, corrupt):
        _assert_clean_outcomes(reference, _mutated(source, edits, corrupt))

    run()
