"""Model I/O: load from a path, bytes or ModelProto, save atomically, summarize.

Loading never modifies the source; saving writes to a temporary file in the target
folder and renames it, so a failure leaves no partial output behind. Models whose
protobuf would exceed the 2 GB limit are written with external data automatically.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from onnxopt.errors import ExternalDataError, ModelLoadError
from onnxopt.external import (
    has_lazy_tensors,
    is_lazy,
    lazy_bytes,
    lazy_source,
    make_lazy,
    materialize,
    write_external_data,
)
from onnxopt.graph import iter_graphs, iter_tensors

__all__ = [
    "PROTOBUF_LIMIT",
    "ModelSource",
    "ModelStats",
    "exceeds_protobuf_limit",
    "load_model",
    "model_stats",
    "save_model",
    "serialized_size",
    "verify_external_data",
]

log = logging.getLogger(__name__)

#: Protobuf refuses to serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1

ModelSource = str | os.PathLike | bytes | onnx.ModelProto


def load_model(source: ModelSource, *, load_external_data: bool = True, lazy: bool = True) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ModelProto (which is copied).

    External data is found in the model's folder; a location that resolves outside
    that folder is refused. With ``lazy`` (the default) external tensors stay in their
    files, checked but not read, and are memory-mapped when a pass reads them
    (:func:`onnxopt.external.tensor_array`); ``lazy=False`` reads them into memory.
    Every failure raises a specific :class:`ModelLoadError`.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ModelLoadError("the model bytes are empty: pass a serialized ONNX model")
        model = _parse(bytes(source), "<bytes>")
        _check_structure(model, "<bytes>")
        return model
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the path to the .onnx model")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the .onnx file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror})") from exc
    if not data:
        raise ModelLoadError(f"{path} is empty (0 bytes); re-export or re-download the model")
    model = _parse(data, str(path))
    _check_structure(model, str(path))
    if load_external_data:
        _load_external_data(model, path.parent.resolve(), str(path), lazy=lazy)
    return model


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{label} is not a valid ONNX model (the protobuf does not parse: truncated or "
            "not ONNX); re-export or re-download it"
        ) from exc
    return model


def _check_structure(model: onnx.ModelProto, label: str) -> None:
    """Catch files that parse as protobuf but are not (whole) ONNX models."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{label} is not an ONNX model (no IR version or graph); pass a .onnx file")
    where = _invalid_text(model, "model")
    if where is not None:
        raise ModelLoadError(
            f"{label}: {where} is not valid UTF-8 text (corrupt file); re-export or re-download the model"
        )
    for tensor in iter_tensors(model):
        problem = _tensor_problem(tensor)
        if problem is not None:
            what = f"tensor {tensor.name!r}" if tensor.name else "an unnamed tensor (a Constant value or attribute)"
            raise ModelLoadError(f"{label}: {what} {problem} (corrupt file); re-export or re-download the model")
    if not model.graph.output:
        raise ModelLoadError(f"{label} has a graph without outputs: the file looks truncated")
    defined = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    defined |= {t.values.name for t in model.graph.sparse_initializer}
    defined.add("")
    for node in model.graph.node:
        missing = [name for name in node.input if name not in defined]
        if missing:
            raise ModelLoadError(
                f"{label}: node {node.name or node.op_type!r} reads {missing[0]!r}, which nothing "
                "defines (truncated or corrupt file); re-export or re-download the model"
            )
        defined.update(node.output)
    if any(o.name not in defined for o in model.graph.output):
        raise ModelLoadError(f"{label}: a graph output is never produced (truncated file?)")


#: element types whose raw_data is whole bytes per element (4-bit and string types are left out)
_BYTE_TYPES: dict[int, int] = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.COMPLEX64: 8,
    onnx.TensorProto.COMPLEX128: 16,
}


def _tensor_problem(tensor: onnx.TensorProto) -> str | None:
    """Return what makes a tensor unreadable (undefined type, payload not matching its shape), or None."""
    if tensor.data_type not in onnx.TensorProto.DataType.values() or tensor.data_type == onnx.TensorProto.UNDEFINED:
        return f"has element type {tensor.data_type}, which is not an ONNX type"
    if any(d < 0 for d in tensor.dims):
        return f"has a negative dimension {list(tensor.dims)}"
    itemsize = _BYTE_TYPES.get(tensor.data_type)
    if itemsize is None or tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return None
    expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    if len(tensor.raw_data) != expected:
        return f"holds {len(tensor.raw_data)} bytes, its shape {list(tensor.dims)} needs {expected} (truncated?)"
    return None


def _invalid_text(message: Message, path: str) -> str | None:
    """Return where a string field holds bytes that are not UTF-8, or None.

    Protobuf parses such a field (it hands back ``bytes``), and the first pass or
    runtime that reads it as text fails far from the cause; one walk at load time
    names it instead. Only string and message fields are read, never tensor payloads.
    """
    for descriptor in message.DESCRIPTOR.fields:
        if descriptor.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue
        # protobuf 6 has ``is_repeated``; older releases only ``label``
        repeated = getattr(descriptor, "is_repeated", None)
        if repeated is None:
            repeated = descriptor.label == FieldDescriptor.LABEL_REPEATED
        if not repeated and not message.HasField(descriptor.name):
            continue
        value = getattr(message, descriptor.name)
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in (value if repeated else [value])):
                return f"{path}.{descriptor.name}"
            continue
        items = list(enumerate(value)) if repeated else [(None, value)]
        for index, item in items:
            where = f"{path}.{descriptor.name}" + (f"[{index}]" if index is not None else "")
            found = _invalid_text(item, where)
            if found is not None:
                return found
    return None


def _external_target(tensor: onnx.TensorProto, base_dir: Path, label: str) -> tuple[Path, int, int | None]:
    """Return (file, offset, length) of an external tensor; refuse locations outside ``base_dir``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    target = (base_dir / location).resolve()
    if not location or (target != base_dir and base_dir not in target.parents):
        raise ExternalDataError(
            f"{label}: tensor {tensor.name!r} points to external data {location!r} outside "
            "the model's folder; move the data file next to the model"
        )
    if not target.is_file():
        raise ExternalDataError(
            f"{label}: external data file {location!r} for tensor {tensor.name!r} is missing; copy it next to the model"
        )
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    if length is not None and target.stat().st_size < offset + length:
        raise ExternalDataError(
            f"{label}: external data {location!r} is shorter than tensor {tensor.name!r} needs (truncated data file)"
        )
    return target, offset, length


def verify_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Check every external-data reference of a model loaded without its data; return their count.

    Lets a runtime read the data itself (no Python copy of a large model) while the same
    rules hold as for :func:`load_model`: inside the model's folder, present, long enough.
    """
    base_dir = Path(path).parent.resolve()
    count = 0
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _external_target(tensor, base_dir, str(path))
            count += 1
    return count


def _load_external_data(model: onnx.ModelProto, base_dir: Path, label: str, *, lazy: bool) -> None:
    """Check external references (refusing locations outside ``base_dir``); mark them lazy or read them."""
    opened: dict[Path, Any] = {}
    try:
        for tensor in iter_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            target, offset, length = _external_target(tensor, base_dir, label)
            if lazy:
                make_lazy(tensor, base_dir)
                continue
            try:
                handle = opened.get(target)
                if handle is None:
                    handle = opened[target] = open(target, "rb")  # noqa: SIM115
                handle.seek(offset)
                raw = handle.read() if length is None else handle.read(length)
            except OSError as exc:
                raise ExternalDataError(
                    f"{label}: cannot read external data of {tensor.name!r} ({exc.strerror})"
                ) from exc
            tensor.raw_data = raw
            tensor.ClearField("data_location")
            del tensor.external_data[:]
    finally:
        for handle in opened.values():
            handle.close()


def serialized_size(model: onnx.ModelProto) -> int:
    """Return the protobuf size of the model in bytes (external data excluded), estimated.

    Protobuf's own ``ByteSize`` serializes the whole message (0.3 s for 90 MB) and
    refuses messages over 2 GB, so tensor payloads are summed and only the small
    messages around them are measured exactly; the estimate is within a few bytes per
    initializer of the true size.
    """
    graph = model.graph
    total = 0
    for tensor in graph.initializer:
        total += len(tensor.raw_data) + _typed_field_bytes(tensor) + len(tensor.name) + 8 * len(tensor.dims) + 16
    for sparse in graph.sparse_initializer:
        total += int(sparse.ByteSize())
    for node in graph.node:
        total += int(node.ByteSize())
    for field_name in ("input", "output", "value_info"):
        total += sum(int(v.ByteSize()) for v in getattr(graph, field_name))
    total += sum(int(f.ByteSize()) for f in model.functions)
    total += sum(int(m.ByteSize()) for m in model.metadata_props) + 64
    return total


def exceeds_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Return True when the model cannot be serialized as one protobuf (over ~2 GB)."""
    # The size estimate is a little low; a 1/32 margin (64 MB) keeps the hard limit out of reach.
    return serialized_size(model) > PROTOBUF_LIMIT - PROTOBUF_LIMIT // 32


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_limit: int | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data=None`` chooses external data when the model has lazy tensors or its
    protobuf would exceed ``size_limit`` (default: the 2 GB protobuf limit). The data
    file is ``<name>.data`` next to the model, written one tensor at a time (lazy
    tensors are copied file to file). The in-memory model is left as it was, except
    that lazy tensors whose data file was just replaced now point into the new one.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    lazy = has_lazy_tensors(model)
    if external_data is not None:
        use_external = external_data
    elif lazy:
        use_external = True
    elif size_limit is not None:
        use_external = serialized_size(model) > size_limit
    else:
        use_external = exceeds_protobuf_limit(model)
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
    try:
        tmp_model = tmpdir / target.name
        data_name = target.name + ".data"
        if use_external:
            final_data = (folder / data_name).resolve()
            changed = write_external_data(model, tmpdir / data_name)
            replaced = False
            try:
                tmp_model.write_bytes(model.SerializeToString())
                os.replace(tmpdir / data_name, final_data)
                replaced = True
            finally:
                _restore(changed, final_data if replaced else None)
        else:
            tmp_model.write_bytes(_inlined(model).SerializeToString() if lazy else model.SerializeToString())
        os.replace(tmp_model, target)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    return target


def _restore(changed: list[tuple[onnx.TensorProto, onnx.TensorProto]], replaced: Path | None) -> None:
    """Put the saved tensors back as they were; rebind lazy ones whose file was replaced."""
    for tensor, original in changed:
        if replaced is not None and is_lazy(original) and lazy_source(original)[0].resolve() == replaced:
            make_lazy(tensor, replaced.parent)  # same bytes, at their offset in the new file
        else:
            tensor.CopyFrom(original)


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every lazy tensor read into memory."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in iter_tensors(copy):
        if is_lazy(tensor):
            materialize(tensor)
    return copy


def _typed_field_bytes(tensor: onnx.TensorProto) -> int:
    return 8 * max(
        len(tensor.float_data),
        len(tensor.int32_data),
        len(tensor.int64_data),
        len(tensor.double_data),
        len(tensor.uint64_data),
    )


@dataclass(frozen=True)
class ModelStats:
    """Size summary of a model: nodes (subgraphs included), parameters and bytes."""

    nodes: int
    params: int
    bytes: int
    subgraphs: int
    ops: dict[str, int] = field(default_factory=dict)
    param_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    weights_in_constants: int = 0

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dictionary."""
        return {
            "nodes": self.nodes,
            "params": self.params,
            "bytes": self.bytes,
            "subgraphs": self.subgraphs,
            "ops": dict(self.ops),
            "param_bytes_by_dtype": dict(self.param_bytes_by_dtype),
            "weights_in_constants": self.weights_in_constants,
        }


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Count nodes, parameters and bytes of ``model`` (subgraphs included)."""
    ops: collections.Counter[str] = collections.Counter()
    graphs = list(iter_graphs(model.graph))
    params = 0
    by_dtype: collections.Counter[str] = collections.Counter()
    in_constants = 0
    for graph in graphs:
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            ops[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
            if node.op_type == "Constant" and domain == "":
                for attr in node.attribute:
                    if attr.name == "value":
                        n = _numel(attr.t)
                        params += n
                        in_constants += n
                        by_dtype[_dtype_name(attr.t.data_type)] += n * _itemsize(attr.t.data_type)
        for tensor in graph.initializer:
            n = _numel(tensor)
            params += n
            by_dtype[_dtype_name(tensor.data_type)] += n * _itemsize(tensor.data_type)
        for sparse in graph.sparse_initializer:
            n = _numel(sparse.values)
            params += n
            by_dtype[_dtype_name(sparse.values.data_type)] += n * _itemsize(sparse.values.data_type)
    return ModelStats(
        nodes=sum(ops.values()),
        params=params,
        bytes=serialized_size(model) + lazy_bytes(model),
        subgraphs=len(graphs) - 1,
        ops=dict(ops.most_common()),
        param_bytes_by_dtype=dict(by_dtype),
        weights_in_constants=in_constants,
    )


def _numel(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def _dtype_name(data_type: int) -> str:
    with contextlib.suppress(ValueError, KeyError):
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)))
    return onnx.TensorProto.DataType.Name(data_type).lower()


def _itemsize(data_type: int) -> int:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    return 1
