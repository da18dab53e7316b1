"""Lazy external-data tensors: weights stay in their files until a pass reads them.

A model loaded with ``lazy=True`` keeps every external tensor as an external reference
(``data_location = EXTERNAL``) and adds the ONNX-standard ``basepath`` entry, the
absolute folder its ``location`` is relative to. Such a tensor is *lazy*: its bytes are
memory-mapped only when :func:`tensor_array` reads it, and :func:`write_external_data`
copies them file to file when the model is saved, so a pipeline over a model of any
size holds only the tensors it is working on. A pass that produces a new large tensor
writes it to a :class:`Spill` file (``replace_initializer(..., spill=ctx.spill)``)
instead of holding it.

``basepath`` never reaches a saved file: saving rewrites every external reference to
the new data file.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.errors import ExternalDataError
from onnxopt.graph import iter_tensors

__all__ = [
    "BASEPATH_KEY",
    "Spill",
    "check_model",
    "external_info",
    "has_lazy_tensors",
    "is_lazy",
    "lazy_bytes",
    "lazy_source",
    "make_lazy",
    "materialize",
    "release",
    "replace_initializer",
    "session_parts",
    "tensor_array",
    "tensor_digest",
    "tensor_fingerprint",
    "write_external_data",
]

log = logging.getLogger(__name__)

#: The external-data key naming the folder a lazy tensor's ``location`` is relative to.
BASEPATH_KEY = "basepath"
#: Bytes copied per read when data moves file to file.
_CHUNK = 16 << 20
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """Return a tensor's external-data entries as a dictionary (empty when it has none)."""
    return {entry.key: entry.value for entry in tensor.external_data}


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """Return True for an external tensor whose data this process can find (``basepath`` set)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == BASEPATH_KEY for entry in tensor.external_data
    )


def has_lazy_tensors(model: onnx.ModelProto) -> bool:
    """Return True when any tensor of ``model`` (subgraphs included) is lazy."""
    return any(is_lazy(t) for t in iter_tensors(model))


def lazy_source(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """Return (file, offset, length) of a lazy tensor's bytes."""
    info = external_info(tensor)
    path = Path(info[BASEPATH_KEY]) / info["location"]
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    return path, offset, length


def lazy_bytes(model: onnx.ModelProto) -> int:
    """Return the bytes the lazy tensors of ``model`` hold in their files."""
    return sum(lazy_source(t)[2] for t in iter_tensors(model) if is_lazy(t))


def make_lazy(tensor: onnx.TensorProto, folder: Path) -> None:
    """Mark an external tensor as lazy, its ``location`` relative to ``folder`` (in place)."""
    for entry in tensor.external_data:
        if entry.key == BASEPATH_KEY:
            entry.value = str(folder)
            return
    entry = tensor.external_data.add()
    entry.key, entry.value = BASEPATH_KEY, str(folder)


def _set_external(tensor: onnx.TensorProto, folder: Path | None, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    if folder is not None:
        make_lazy(tensor, folder)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
    except OSError as exc:
        raise ExternalDataError(f"cannot read external data {path} ({exc.strerror})") from exc
    if len(raw) != length:
        raise ExternalDataError(f"external data {path} is shorter than a tensor needs (truncated data file)")
    return raw


def _numpy_dtype(data_type: int) -> np.dtype | None:
    """Return the numpy dtype whose bytes are the tensor's raw bytes, None for packed/custom types."""
    plain: dict[int, type] = {
        onnx.TensorProto.FLOAT: np.float32,
        onnx.TensorProto.DOUBLE: np.float64,
        onnx.TensorProto.FLOAT16: np.float16,
        onnx.TensorProto.INT8: np.int8,
        onnx.TensorProto.UINT8: np.uint8,
        onnx.TensorProto.INT16: np.int16,
        onnx.TensorProto.UINT16: np.uint16,
        onnx.TensorProto.INT32: np.int32,
        onnx.TensorProto.UINT32: np.uint32,
        onnx.TensorProto.INT64: np.int64,
        onnx.TensorProto.UINT64: np.uint64,
        onnx.TensorProto.BOOL: np.bool_,
    }
    found = plain.get(data_type)
    return None if found is None else np.dtype(found).newbyteorder("<")


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """Return a tensor's value; the one accessor passes read weights through.

    A lazy tensor of a plain numeric type comes back as a read-only memory map of its
    file (pages are read on demand and released when the array goes); packed types
    (int4, bfloat16, float8) are read and converted. Other tensors go through
    ``onnx.numpy_helper``. Never write into the result: copy it first.
    """
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = lazy_source(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    dtype = _numpy_dtype(tensor.data_type)
    if dtype is not None and length == dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        if length == 0:
            return np.zeros(shape, dtype)
        try:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        except (OSError, ValueError) as exc:
            raise ExternalDataError(f"cannot map external data {path} of tensor {tensor.name!r}: {exc}") from exc
    return numpy_helper.to_array(materialize(tensor, copy=True))


def release(array: np.ndarray) -> bool:
    """Drop the pages a memory-mapped array (or a view of one) has read; return True if it was mapped.

    A pass that reads weights one after another calls this when it is done with one, so
    the pages it read do not stay resident (and counted in its memory) until the mapping
    goes away; the array stays valid and re-reads its file if touched again.
    """
    base: object = array
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    handle = getattr(base, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    handle.madvise(mmap.MADV_DONTNEED)
    return True


def materialize(tensor: onnx.TensorProto, *, copy: bool = False) -> onnx.TensorProto:
    """Read a lazy tensor's bytes into ``raw_data`` (in place, or into a copy with ``copy=True``)."""
    target = tensor
    if copy:
        target = onnx.TensorProto()
        target.CopyFrom(tensor)
    if is_lazy(target):
        path, offset, length = lazy_source(target)
        raw = _read_range(path, offset, length)
        del target.external_data[:]
        target.ClearField("data_location")
        target.raw_data = raw
    return target


def tensor_digest(tensor: onnx.TensorProto) -> bytes:
    """Return a digest of a tensor's value bytes, reading a lazy tensor's file in chunks."""
    digest = hashlib.blake2b(digest_size=20)
    if is_lazy(tensor):
        path, offset, length = lazy_source(tensor)
        with open(path, "rb") as handle:
            for block in _blocks(handle, path, offset, length, f"tensor {tensor.name!r}"):
                digest.update(block)
    elif tensor.HasField("raw_data"):
        digest.update(tensor.raw_data)
    else:
        digest.update(np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes())
    return digest.digest()


def tensor_fingerprint(tensor: onnx.TensorProto, block: int = 4096) -> bytes:
    """Return a few sampled blocks of a tensor's bytes (start, middle, end) with its length.

    Equal tensors have equal fingerprints; unequal ones almost always differ in them, so
    a search for duplicates compares fingerprints first and digests only on a match.
    """
    if is_lazy(tensor):
        path, offset, length = lazy_source(tensor)
        starts = sorted({0, max(0, length // 2 - block // 2), max(0, length - block)})
        with open(path, "rb") as handle:
            parts = []
            for start in starts:
                handle.seek(offset + start)
                parts.append(handle.read(min(block, length - start)))
        return length.to_bytes(8, "little") + b"".join(parts)
    raw = (
        tensor.raw_data
        if tensor.HasField("raw_data")
        else np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()
    )
    length = len(raw)
    starts = sorted({0, max(0, length // 2 - block // 2), max(0, length - block)})
    return length.to_bytes(8, "little") + b"".join(raw[start : start + block] for start in starts)


class Spill:
    """An append-only scratch file for large tensors a pass produces.

    :meth:`tensor` writes an array to the file and returns a lazy tensor pointing at
    it, so a rewritten weight costs disk, not memory. The folder is removed by
    :meth:`close` (the model must be saved before that: saving copies the bytes).
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnxopt-spill-", dir=folder)
        self.folder = Path(self._dir.name)
        self._name = "spill.data"
        self._handle: BinaryIO | None = open(self.folder / self._name, "wb")  # noqa: SIM115
        self.written = 0

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """Write ``array`` and return a lazy TensorProto named ``name`` that reads it back."""
        return self.adopt(numpy_helper.from_array(np.asarray(array), name))

    def adopt(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """Move a tensor's ``raw_data`` (any dtype, e.g. packed int4) to the file; return it, now lazy."""
        if self._handle is None:
            raise ValueError("the spill file is closed")
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        raw = tensor.raw_data
        offset = self._handle.tell()
        pad = (-offset) % 64
        if pad:
            self._handle.write(b"\0" * pad)
            offset += pad
        self._handle.write(raw)
        self._handle.flush()
        self.written += len(raw)
        _set_external(tensor, self.folder, self._name, offset, len(raw))
        return tensor

    def close(self) -> None:
        """Close and delete the spill file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._dir.cleanup()

    def __enter__(self) -> Spill:
        """Return the spill itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the spill."""
        self.close()


def replace_initializer(
    graph: onnx.GraphProto, name: str, array: np.ndarray, *, spill: Spill | None = None, min_bytes: int = 1 << 20
) -> onnx.TensorProto:
    """Set initializer ``name`` of ``graph`` to ``array`` (added when absent); return the tensor.

    With ``spill``, an array of at least ``min_bytes`` is written to the spill file and
    the initializer becomes a lazy reference to it, so the pass does not hold it.
    """
    if spill is not None and array.nbytes >= min_bytes:
        tensor = spill.tensor(array, name)
    else:
        tensor = numpy_helper.from_array(np.asarray(array), name)
    for existing in graph.initializer:
        if existing.name == name:
            existing.CopyFrom(tensor)
            return existing
    graph.initializer.append(tensor)
    return graph.initializer[-1]


def _copy_range(source: Path, offset: int, length: int, out: BinaryIO) -> None:
    """Append ``length`` bytes of ``source`` from ``offset`` to ``out`` without holding them."""
    out.flush()
    with open(source, "rb") as handle:
        if hasattr(os, "copy_file_range"):
            remaining, position = length, offset
            while remaining > 0:
                moved = os.copy_file_range(handle.fileno(), out.fileno(), remaining, position)
                if moved <= 0:
                    break
                remaining -= moved
                position += moved
            if remaining == 0:
                out.seek(0, os.SEEK_END)
                return
            length, offset = remaining, position
        for block in _blocks(handle, source, offset, length, "a tensor"):
            out.write(block)


def _blocks(handle: BinaryIO, path: Path | str, offset: int, length: int, what: str) -> Iterator[bytes]:
    """Yield ``length`` bytes of open file ``handle`` from ``offset`` in chunks; a short file is an error."""
    handle.seek(offset)
    while length > 0:
        block = handle.read(min(_CHUNK, length))
        if not block:
            raise ExternalDataError(f"external data {path} is shorter than {what} needs")
        yield block
        length -= len(block)


def _external_candidates(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in iter_tensors(model):
        if is_lazy(tensor):
            yield tensor
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # a reference without data (loaded with load_external_data=False): kept as is
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
                yield tensor
        elif (
            8 * max(len(tensor.float_data), len(tensor.int32_data), len(tensor.int64_data)) >= EXTERNAL_TENSOR_MIN_BYTES
        ):
            yield tensor


def write_external_data(model: onnx.ModelProto, data_path: Path) -> list[tuple[onnx.TensorProto, onnx.TensorProto]]:
    """Write the large tensors of ``model`` one at a time to ``data_path``; point them at it.

    Lazy tensors are copied file to file; in-memory ones are written from their bytes.
    Returns (tensor, original) pairs so the caller can restore the model in memory after
    serializing it.
    """
    changed: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    with open(data_path, "wb") as out:
        for tensor in _external_candidates(model):
            original = onnx.TensorProto()
            original.CopyFrom(tensor)
            offset = out.tell()
            pad = (-offset) % 4096
            if pad:
                out.write(b"\0" * pad)
                offset += pad
            if is_lazy(tensor):
                source, source_offset, length = lazy_source(tensor)
                _copy_range(source, source_offset, length, out)
            else:
                if not tensor.HasField("raw_data"):
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
            _set_external(tensor, None, data_path.name, offset, length)
            changed.append((tensor, original))
    return changed


def _placeholder_copy(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    """Return a copy of ``model`` whose lazy tensors all point at ``location`` (no data read)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in iter_tensors(copy):
        if is_lazy(tensor):
            info = external_info(tensor)
            _set_external(tensor, None, location, int(info.get("offset", 0)), int(info.get("length", 0)))
    return copy


def check_model(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """Run ``onnx.checker`` on a model that may hold lazy tensors, without reading their data.

    The checker only requires an external location to be a regular file in the model's
    folder, so a lazy model is checked as a copy in a temporary folder whose tensors all
    point at one empty file there; everything else (graph, types, opsets) is checked as usual.
    """
    if not has_lazy_tensors(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as folder:
        (Path(folder) / "lazy.data").touch()
        path = Path(folder) / "model.onnx"
        path.write_bytes(_placeholder_copy(model, "lazy.data").SerializeToString())
        onnx.checker.check_model(str(path), full_check=full_check)


def session_parts(model: onnx.ModelProto) -> tuple[bytes, list[str], list[np.ndarray]]:
    """Return (model bytes, names, arrays) to build an onnxruntime session of a lazy model.

    Main-graph lazy initializers are handed to onnxruntime as memory-mapped arrays
    (``SessionOptions.add_external_initializers``, which uses the buffers without
    copying them); lazy tensors elsewhere (subgraphs, Constant attributes) are read
    into the copy. Keep the arrays alive as long as the session.
    """
    copy = _placeholder_copy(model, "__onnxopt_lazy__")
    names: list[str] = []
    arrays: list[np.ndarray] = []
    main = len(model.graph.initializer)  # iter_tensors yields the main graph's initializers first
    for index, (original, tensor) in enumerate(zip(iter_tensors(model), iter_tensors(copy), strict=True)):
        if not is_lazy(original):
            continue
        if index < main:
            array = tensor_array(original)
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            names.append(original.name)
            arrays.append(array)
        else:
            tensor.CopyFrom(materialize(original, copy=True))
    return copy.SerializeToString(), names, arrays
