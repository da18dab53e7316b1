"""Real inputs for the real models, and the task metrics that judge an optimized model.

Each ``*_inputs`` function returns a list of feed dicts, one batch-1 sample each, named
and typed like the model's inputs; all samples of one call share one shape, so they stack
into an npz (``np.stack`` on a new first axis). Everything is generated locally and
deterministically:

- text detection: the photographs and scans that ship with scikit-image, cropped, flipped
  and rescaled, preprocessed like rapidocr-onnxruntime 1.4.4 (``DetPreProcess``);
- text direction: text lines rendered with Pillow, half of them rotated by 180 degrees,
  preprocessed like rapidocr's ``TextClassifier.resize_norm_img``;
- voice activity: a formant-synthesized, speech-like audio stream with pauses and several
  kinds of noise, cut into chunks with the recurrent state the model carries from the
  previous chunks (as silero-vad's ``OnnxWrapper`` and ``SileroVADSequence`` do);
- sentence encoder: tokenized :data:`benchmarks.encoder.SENTENCES`.

:func:`task_metrics` / :func:`task_agreement` compare a candidate's outputs with the
reference's on what the model is for (detected text area, predicted class, speech
decision, sentence-embedding direction) rather than on raw numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.models import fetch

__all__ = [
    "DET_IMAGES",
    "SAMPLE_RATE",
    "encoder_inputs",
    "ppocr_cls_inputs",
    "ppocr_cls_labels",
    "ppocr_det_inputs",
    "run_model",
    "speech_like_audio",
    "task_agreement",
    "task_metrics",
    "vad_inputs",
]

Feed = dict[str, np.ndarray]

# --------------------------------------------------------------------------- text detection

DET_IMAGES = (
    "text",
    "page",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "stereo_motorcycle",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "logo",
    "clock",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
    "cat",
    "microaneurysms",
)
"""The scikit-image images used for detection, documents with text first."""

_TEXT_IMAGES = frozenset({"text", "page"})


@cache
def _skimage_rgb(name: str) -> np.ndarray:
    """Return a bundled scikit-image picture as RGB uint8 (grey and RGBA converted)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo pairs: take the left view
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:  # composite on white, as rapidocr does for RGBA input
        alpha = image[:, :, 3:].astype(np.float32) / 255
        image = (image[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return image


def _det_view(image: np.ndarray, variant: int, size: tuple[int, int], seed: int, mirror: bool) -> Image.Image:
    """Return one view of ``image`` with the aspect ratio of ``size`` (height, width).

    Variant 0 is the whole picture, letterboxed on its border colour; later variants are
    random crops (40–100 % of the largest crop of that aspect), flipped when ``mirror``.
    """
    height, width = image.shape[:2]
    target_h, target_w = size
    picture = Image.fromarray(image)
    if variant == 0:
        scale = min(target_h / height, target_w / width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        border = tuple(
            int(v) for v in np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
        )
        canvas = Image.new("RGB", (target_w, target_h), border)
        canvas.paste(
            picture.resize((new_w, new_h), Image.Resampling.BILINEAR),
            ((target_w - new_w) // 2, (target_h - new_h) // 2),
        )
        return canvas
    rng = np.random.default_rng([seed, variant])
    aspect = target_w / target_h
    crop_w = min(width, height * aspect)
    scale = rng.uniform(0.4, 1.0)
    crop_w = max(8.0, crop_w * scale)
    crop_h = crop_w / aspect
    left = rng.uniform(0, width - crop_w)
    top = rng.uniform(0, height - crop_h)
    view = picture.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
    if mirror and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view


def _add_caption(view: Image.Image, index: int, rng: np.random.Generator) -> Image.Image:
    """Print a caption line on a photograph, as on signs, slides and annotated pictures."""
    from benchmarks.encoder import SENTENCES

    view = view.convert("RGB")
    words = SENTENCES[(index * 53) % len(SENTENCES)].rstrip(".?!").split()[:6]
    fonts = _fonts()
    font_path = fonts[index % len(fonts)]
    size = max(10, int(view.height * rng.uniform(0.05, 0.1)))
    font = ImageFont.load_default(size=size) if font_path is None else ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(" ".join(words))
    while len(words) > 1 and right - left > 0.9 * view.width:
        words = words[:-1]
        left, top, right, bottom = font.getbbox(" ".join(words))
    x = rng.uniform(0, max(1.0, view.width - (right - left)))
    y = rng.uniform(0, max(1.0, view.height - (bottom - top)))
    bright = rng.random() < 0.5
    ink = (255, 255, 255) if bright else tuple(int(v) for v in rng.integers(0, 80, size=3))
    shadow = (0, 0, 0) if bright else (255, 255, 255)
    draw = ImageDraw.Draw(view)
    draw.text((x - left + 1, y - top + 1), " ".join(words), font=font, fill=shadow)
    draw.text((x - left, y - top), " ".join(words), font=font, fill=ink)
    return view


def _det_preprocess(view: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Apply rapidocr's ``DetPreProcess`` to an RGB picture: [1, 3, H, W] float32.

    rapidocr reads images as BGR, resizes them (bilinear) so that both sides are
    multiples of 32 and normalizes with mean = std = 0.5 after scaling to [0, 1].
    Here the multiple-of-32 size is fixed to ``size`` so that samples stack.
    """
    height, width = size
    if height % 32 or width % 32:
        raise ValueError(f"detector input sides must be multiples of 32, got {size}")
    resized = np.asarray(view.resize((width, height), Image.Resampling.BILINEAR))
    bgr = resized[:, :, ::-1].astype(np.float32)
    normalized = (bgr * (1 / 255.0) - 0.5) / 0.5
    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[None], dtype=np.float32)


def ppocr_det_inputs(n: int, size: tuple[int, int] = (480, 640), seed: int = 0) -> list[Feed]:
    """Return ``n`` preprocessed photographs and scans for the PP-OCR text detector.

    Sample ``i`` comes from image ``DET_IMAGES[i % len(DET_IMAGES)]``, so the first samples
    cover every picture (the text scans first); later rounds use crops and flips. Every
    other photograph gets a printed caption, so that text covers a fair share of the maps.
    rapidocr scales the short side up to 736 (``limit_type: min``); the default
    (480, 640) keeps a run on two cores fast.
    """
    feeds = []
    for index in range(n):
        name = DET_IMAGES[index % len(DET_IMAGES)]
        variant = index // len(DET_IMAGES)
        view = _det_view(_skimage_rgb(name), variant, size, seed + index, mirror=name not in _TEXT_IMAGES)
        if name not in _TEXT_IMAGES and index % 2:
            view = _add_caption(view.resize(size[::-1]), index, np.random.default_rng([seed, index, 1]))
        feeds.append({"x": _det_preprocess(view, size)})
    return feeds


# --------------------------------------------------------------------------- text direction

_CLS_SHAPE = (3, 48, 192)


def _fonts() -> list[Path | None]:
    """Return the TrueType fonts to render with (matplotlib's DejaVu, else Pillow's own)."""
    try:
        import matplotlib
    except ImportError:
        return [None]
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = [
        "DejaVuSans.ttf",
        "DejaVuSerif.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSansMono.ttf",
        "DejaVuSerif-Italic.ttf",
        "DejaVuSans-Oblique.ttf",
    ]
    found: list[Path | None] = [folder / name for name in names if (folder / name).is_file()]
    return found or [None]


def _text_line(index: int, rng: np.random.Generator) -> Image.Image:
    """Render a short line of English text on a light background (RGB)."""
    from benchmarks.encoder import SENTENCES

    words = SENTENCES[(index * 37) % len(SENTENCES)].rstrip(".?!").split()
    count = int(rng.integers(2, 6))
    start = int(rng.integers(0, max(1, len(words) - count + 1)))
    text = " ".join(words[start : start + count])
    fonts = _fonts()
    font_path = fonts[index % len(fonts)]
    size = int(rng.integers(22, 40))
    font = ImageFont.load_default(size=size) if font_path is None else ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 12)), int(rng.integers(2, 8))
    background = tuple(int(v) for v in rng.integers(190, 256, size=3))
    if rng.random() < 0.6:
        ink = tuple(int(v) for v in rng.integers(0, 50, size=3))
    else:  # coloured ink: one strong channel
        ink = tuple(int(v) for v in rng.permutation([int(rng.integers(120, 220)), 20, 40]))
    extent = (math.ceil(right - left) + 2 * pad_x, math.ceil(bottom - top) + 2 * pad_y)
    picture = Image.new("RGB", extent, background)
    ImageDraw.Draw(picture).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    return picture


def _cls_preprocess(picture: Image.Image) -> np.ndarray:
    """Apply rapidocr's ``TextClassifier.resize_norm_img``: [1, 3, 48, 192] float32.

    The line is resized to height 48 keeping its aspect ratio (width capped at 192),
    scaled to [-1, 1] in BGR order and zero-padded on the right to width 192.
    """
    channels, height, width = _CLS_SHAPE
    ratio = picture.width / picture.height
    resized_w = width if math.ceil(height * ratio) > width else math.ceil(height * ratio)
    resized = np.asarray(picture.resize((resized_w, height), Image.Resampling.BILINEAR))
    bgr = resized[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255
    padded = np.zeros((channels, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = (bgr - 0.5) / 0.5
    return padded[None]


def ppocr_cls_labels(n: int) -> np.ndarray:
    """Return the true direction class (0: upright, 1: rotated 180°) of each cls sample."""
    return (np.arange(n) % 2).astype(np.int64)


def ppocr_cls_inputs(n: int, seed: int = 0) -> list[Feed]:
    """Return ``n`` rendered text lines for the PP-OCR direction classifier.

    Odd samples are rotated by 180 degrees (see :func:`ppocr_cls_labels`).
    """
    feeds = []
    for index, label in enumerate(ppocr_cls_labels(n)):
        picture = _text_line(index, np.random.default_rng([seed, index]))
        if label:
            picture = picture.rotate(180)
        feeds.append({"x": _cls_preprocess(picture)})
    return feeds


# --------------------------------------------------------------------------- voice activity

SAMPLE_RATE = 16_000
_FRAME, _CONTEXT = 512, 64  # silero-vad at 16 kHz: 512 new samples + 64 of context

_VOWELS = {  # first three formants (Hz) of a few English vowels
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (270, 2290, 3010),
    "o": (570, 840, 2410),
    "u": (300, 870, 2240),
    "ae": (660, 1720, 2410),
}


def _resonate(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """Filter ``signal`` through one formant resonator (a two-pole filter, unit DC gain)."""
    from scipy.signal import lfilter

    radius = math.exp(-math.pi * bandwidth / SAMPLE_RATE)
    a1 = -2 * radius * math.cos(2 * math.pi * frequency / SAMPLE_RATE)
    a2 = radius * radius
    return lfilter([1 + a1 + a2], [1, a1, a2], signal)


def _syllable(rng: np.random.Generator, pitch: float) -> np.ndarray:
    """Synthesize one syllable: an optional fricative onset and a voiced vowel."""
    from scipy.signal import butter, sosfilt

    parts = []
    if rng.random() < 0.5:  # fricative or plosive burst
        length = int(SAMPLE_RATE * rng.uniform(0.01, 0.08))
        cutoff = rng.uniform(2000, 5000)
        sos = butter(4, cutoff, btype="highpass", fs=SAMPLE_RATE, output="sos")
        burst = sosfilt(sos, rng.standard_normal(length)) * rng.uniform(0.05, 0.3)
        parts.append(burst * np.hanning(length))
    length = int(SAMPLE_RATE * rng.uniform(0.08, 0.25))
    time = np.arange(length) / SAMPLE_RATE
    # A falling or rising intonation with vibrato-like jitter.
    f0 = (
        pitch
        * (1 + rng.uniform(-0.15, 0.1) * time / time[-1])
        * (1 + 0.01 * np.sin(2 * math.pi * rng.uniform(4, 7) * time))
    )
    phase = 2 * math.pi * np.cumsum(f0) / SAMPLE_RATE
    harmonics = np.arange(1, int(4000 / pitch) + 1)
    source = (np.sin(np.outer(phase, harmonics)) / harmonics**1.2).sum(axis=1)
    source += 0.02 * rng.standard_normal(length)  # breathiness
    voiced = source
    for formant, bandwidth in zip(_VOWELS[str(rng.choice(list(_VOWELS)))], (80, 100, 140), strict=True):
        voiced = _resonate(voiced, formant * rng.uniform(0.92, 1.08), bandwidth)
    attack = max(2, int(0.02 * SAMPLE_RATE))
    envelope = np.ones(length)
    envelope[:attack] = np.linspace(0, 1, attack)
    envelope[-2 * attack :] = np.linspace(1, 0, 2 * attack)
    voiced = voiced / (np.abs(voiced).max() + 1e-9) * envelope
    parts.append(voiced)
    return np.concatenate(parts)


def _phrase(rng: np.random.Generator) -> np.ndarray:
    """Synthesize a phrase of a few words with short pauses, in one speaker's pitch."""
    pitch = rng.uniform(90, 240)
    pieces = []
    for _ in range(int(rng.integers(2, 7))):
        for _ in range(int(rng.integers(1, 4))):
            pieces.append(_syllable(rng, pitch * rng.uniform(0.9, 1.1)))
        pieces.append(np.zeros(int(SAMPLE_RATE * rng.uniform(0.03, 0.15))))
    return np.concatenate(pieces) * rng.uniform(0.2, 0.8)


def _noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """Return a stretch of background sound: near silence, hiss, rumble or mains hum."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return 1e-4 * rng.standard_normal(length)
    if kind == 1:  # white hiss
        return rng.uniform(0.002, 0.03) * rng.standard_normal(length)
    if kind == 2:  # brown-ish rumble (fan, traffic)
        walk = np.cumsum(rng.standard_normal(length))
        walk -= np.convolve(walk, np.ones(400) / 400, mode="same")
        return walk / (np.abs(walk).max() + 1e-9) * rng.uniform(0.01, 0.1)
    time = np.arange(length) / SAMPLE_RATE
    hum = sum(np.sin(2 * math.pi * 50 * k * time) / k for k in (1, 2, 3, 5))
    return hum * rng.uniform(0.005, 0.05) + 1e-3 * rng.standard_normal(length)


def speech_like_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Return a 16 kHz float32 stream alternating speech-like phrases and background sound.

    The "speech" is formant-synthesized (harmonic source, three vowel formants, fricative
    onsets, syllable envelopes, pauses between words) and mixed with background noise;
    between phrases there are 0.3–2 s of noise or near silence.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    length = 0
    speaking = bool(rng.integers(0, 2))
    while length < total:
        if speaking:
            voice = _phrase(rng)
            piece = voice + _noise(rng, len(voice)) * 0.5
        else:
            piece = _noise(rng, int(SAMPLE_RATE * rng.uniform(0.3, 2.0)))
        pieces.append(piece)
        length += len(piece)
        speaking = not speaking
    audio = np.concatenate(pieces)[:total]
    return np.clip(audio, -1, 1).astype(np.float32)


def _frames(audio: np.ndarray) -> np.ndarray:
    """Cut ``audio`` into [frames, 576] rows: 64 samples of context + 512 new samples."""
    count = len(audio) // _FRAME
    frames = audio[: count * _FRAME].reshape(count, _FRAME)
    context = np.zeros((count, _CONTEXT), dtype=np.float32)
    context[1:] = frames[:-1, -_CONTEXT:]
    return np.concatenate([context, frames], axis=1)


def vad_inputs(model_key: str, n: int, seed: int = 0, frames_per_sample: int = 16) -> list[Feed]:
    """Return ``n`` consecutive chunks of speech-like audio for a Silero VAD model.

    Streaming models (inputs ``input``, ``state`` and, where present, ``sr``) get one
    576-sample chunk per sample with the state the model itself reached on the chunks
    before it. The sequence model (inputs ``input``, ``h``, ``c``) gets blocks of
    ``frames_per_sample`` chunks with the LSTM state carried over from the previous block.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(fetch(model_key)), providers=["CPUExecutionProvider"])
    names = {item.name for item in session.get_inputs()}
    sequence = "h" in names
    per_sample = frames_per_sample if sequence else 1
    frames = _frames(speech_like_audio((n * per_sample + 1) * _FRAME / SAMPLE_RATE, seed))
    feeds: list[Feed] = []
    if sequence:
        hidden = np.zeros((1, 1, 128), np.float32)
        cell = np.zeros((1, 1, 128), np.float32)
        for index in range(n):
            block = frames[index * per_sample : (index + 1) * per_sample]
            feeds.append({"input": block, "h": hidden, "c": cell})
            _, hidden, cell = session.run(["speech_probs", "hn", "cn"], feeds[-1])
        return feeds
    state = np.zeros((2, 1, 128), np.float32)
    for index in range(n):
        feed = {"input": frames[index : index + 1], "state": state}
        if "sr" in names:
            feed["sr"] = np.array(SAMPLE_RATE, dtype=np.int64)
        feeds.append(feed)
        _, state = session.run(["output", "stateN"], feed)
    return feeds


# --------------------------------------------------------------------------- sentence encoder


def encoder_inputs(n: int, offset: int = 0, length: int = 64) -> list[Feed]:
    """Return ``n`` tokenized sentences, each padded to ``length`` tokens (batch 1)."""
    from benchmarks.encoder import SENTENCES, encode_sentences

    chosen = SENTENCES[offset : offset + n]
    if len(chosen) < n:
        raise ValueError(f"only {len(SENTENCES)} sentences, asked for {offset} + {n}")
    batch = encode_sentences(chosen, max_len=length, pad_to=length)
    return [{name: array[i : i + 1] for name, array in batch.items()} for i in range(n)]


# --------------------------------------------------------------------------- running, metrics

Outputs = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def run_model(path: str | Path, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """Run a model under onnxruntime (CPU) on each feed; return the outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed), strict=True)) for feed in feeds]


def _output(outputs: Outputs, preferred: Sequence[str] = ()) -> np.ndarray:
    """Return the output named in ``preferred`` if present, else the first output."""
    if isinstance(outputs, Mapping):
        for name in preferred:
            if name in outputs:
                return np.asarray(outputs[name])
        return np.asarray(next(iter(outputs.values())))
    return np.asarray(outputs[0])


def _task(key: str) -> str:
    for prefix, task in (
        ("ppocr_det", "det"),
        ("ppocr_cls", "cls"),
        ("ppocr_rec", "rec"),
        ("doclayout", "layout"),
        ("silero_vad", "vad"),
        ("encoder", "encoder"),
        ("digits", "cls"),
    ):
        if key.startswith(prefix):
            return task
    raise ValueError(f"no task metric for model {key!r}")


def _embeddings(outputs: Sequence[Outputs], inputs: Sequence[Feed] | None) -> np.ndarray:
    """Return unit sentence embeddings [samples, width] from encoder outputs."""
    vectors = []
    for index, sample in enumerate(outputs):
        if isinstance(sample, Mapping) and "sentence_embedding" in sample:
            vector = np.asarray(sample["sentence_embedding"], dtype=np.float64).reshape(-1)
        else:
            hidden = _output(sample, ["last_hidden_state"])[0].astype(np.float64)
            if inputs is None:
                raise ValueError("pooling last_hidden_state needs the inputs' attention_mask")
            mask = inputs[index]["attention_mask"][0].astype(np.float64)[:, None]
            vector = (hidden * mask).sum(axis=0) / max(mask.sum(), 1e-9)
        vectors.append(vector / max(float(np.linalg.norm(vector)), 1e-12))
    return np.stack(vectors)


def task_metrics(
    key: str, ref_outputs: Sequence[Outputs], cand_outputs: Sequence[Outputs], inputs: Sequence[Feed] | None = None
) -> dict[str, float]:
    """Compare a candidate's outputs with the reference's on the model's task.

    ``ref_outputs`` and ``cand_outputs`` hold one entry per sample: a mapping from output
    name to array, or the list of outputs in the model's order. ``key`` is the model key
    (``ppocr_det``, ``ppocr_cls``, ``silero_vad*``, ``encoder``, ``digits``). The first
    entry of the result is the task agreement (1.0 = same behaviour):

    - det: ``iou``, the IoU of the text masks (probability > 0.3) pooled over samples;
    - cls (also digits): ``top1_agreement`` of the predicted classes;
    - encoder: ``mean_cosine`` of the sentence embeddings (mean over unmasked tokens of
      ``last_hidden_state`` when the model has no ``sentence_embedding`` output);
    - vad: ``decision_agreement`` of the per-chunk speech decisions (probability > 0.5),
      and ``mean_abs_diff`` of the probabilities;
    - rec (PP-OCRv4 rec): ``sequence_agreement`` of the greedy CTC decodes (blank 0);
    - layout (YOLOv8 layout detector): ``detection_agreement`` of the detections after NMS
      at score 0.25 (class and box IoU > 0.5; see :func:`onnxopt.harness.metrics.detection`).
    """
    if len(ref_outputs) != len(cand_outputs):
        raise ValueError(f"{len(ref_outputs)} reference samples, {len(cand_outputs)} candidate")
    task = _task(key)
    if task == "det":
        intersection = union = 0
        for ref, cand in zip(ref_outputs, cand_outputs, strict=True):
            ref_mask, cand_mask = _output(ref) > 0.3, _output(cand) > 0.3
            intersection += int(np.logical_and(ref_mask, cand_mask).sum())
            union += int(np.logical_or(ref_mask, cand_mask).sum())
        return {"iou": intersection / union if union else 1.0}
    if task in ("rec", "layout"):
        from onnxopt.harness import metrics

        metric = metrics.ctc if task == "rec" else metrics.detection
        ref = [_output(r) for r in ref_outputs]
        cand = [_output(c) for c in cand_outputs]
        name = "sequence_agreement" if task == "rec" else "detection_agreement"
        return {name: metric(ref, cand, None, "0" if task == "rec" else "0.25").value}
    if task == "cls":
        ref_class = np.array([_output(r).reshape(-1).argmax() for r in ref_outputs])
        cand_class = np.array([_output(c).reshape(-1).argmax() for c in cand_outputs])
        return {"top1_agreement": float(np.mean(ref_class == cand_class))}
    if task == "encoder":
        ref_vectors = _embeddings(ref_outputs, inputs)
        cand_vectors = _embeddings(cand_outputs, inputs)
        return {"mean_cosine": float(np.mean(np.sum(ref_vectors * cand_vectors, axis=1)))}
    names = ["output", "speech_probs"]
    ref_probs = np.concatenate([_output(r, names).reshape(-1) for r in ref_outputs])
    cand_probs = np.concatenate([_output(c, names).reshape(-1) for c in cand_outputs])
    return {
        "decision_agreement": float(np.mean((ref_probs > 0.5) == (cand_probs > 0.5))),
        "mean_abs_diff": float(np.mean(np.abs(ref_probs - cand_probs))),
    }


def task_agreement(
    key: str, ref_outputs: Sequence[Outputs], cand_outputs: Sequence[Outputs], inputs: Sequence[Feed] | None = None
) -> float:
    """Return the task agreement of a candidate with the reference (see :func:`task_metrics`)."""
    metrics = task_metrics(key, ref_outputs, cand_outputs, inputs)
    return next(iter(metrics.values()))
