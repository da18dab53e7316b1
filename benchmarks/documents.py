"""Real inputs for the document models: rendered pages (layout detector) and text lines (recognizer).

Pages are drawn with Pillow: a title, paragraphs of real sentences in matplotlib's DejaVu
fonts, a ruled table and a matplotlib chart, laid out in one or two columns, letterboxed
to the detector's 1024×1024 input the way Ultralytics does (grey 114 borders, RGB, /255).
Text lines for PP-OCRv4 rec are rendered like the cls lines and resized to height 48.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.inputs import _fonts, _text_line

__all__ = ["LAYOUT_SIZE", "layout_pages", "rec_lines"]

Feed = dict[str, np.ndarray]

LAYOUT_SIZE = 1024


def _font(size: int, index: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    fonts = _fonts()
    path = fonts[index % len(fonts)]
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(str(path), size)


def _paragraph(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rng: np.random.Generator, font) -> int:
    """Fill ``box`` (left, top, right, bottom) with wrapped sentences; return the y reached."""
    from benchmarks.encoder import SENTENCES

    left, top, right, bottom = box
    words = " ".join(SENTENCES[int(i)] for i in rng.integers(0, len(SENTENCES), 6)).split()
    line, y = "", top
    height = font.getbbox("Ag")[3] + 4
    for word in words:
        trial = f"{line} {word}".strip()
        if font.getlength(trial) > right - left and line:
            draw.text((left, y), line, font=font, fill=(20, 20, 20))
            y += height
            line = word
            if y + height > bottom:
                return y
        else:
            line = trial
    if line:
        draw.text((left, y), line, font=font, fill=(20, 20, 20))
        y += height
    return y


def _table(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], rng: np.random.Generator, font) -> None:
    left, top, right, bottom = box
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
    for r in range(rows + 1):
        y = top + (bottom - top) * r // rows
        draw.line([(left, y), (right, y)], fill=(0, 0, 0), width=1)
    for c in range(cols + 1):
        x = left + (right - left) * c // cols
        draw.line([(x, top), (x, bottom)], fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            value = f"{rng.uniform(0, 1000):.1f}" if r else f"col {c + 1}"
            draw.text(
                (left + (right - left) * c // cols + 4, top + (bottom - top) * r // rows + 3), value, font=font, fill=0
            )


def _chart(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    x = np.linspace(0, 10, 50)
    for _ in range(int(rng.integers(1, 4))):
        axes.plot(x, np.sin(x * rng.uniform(0.3, 2)) * rng.uniform(0.5, 3) + rng.normal(size=x.size) * 0.1)
    axes.set_title("Figure", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB").resize(size)


def _page(index: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, index, 7])
    width, height = 850, 1100  # US letter at 100 dpi
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    body = _font(int(rng.integers(13, 18)), index)
    draw.text((60, 50), f"Section {index + 1}: Results and discussion", font=_font(30, index + 2), fill=0)
    columns = 2 if rng.random() < 0.5 else 1
    gutter = 30
    column_width = (width - 120 - gutter * (columns - 1)) // columns
    for column in range(columns):
        left = 60 + column * (column_width + gutter)
        y = 110
        for _ in range(int(rng.integers(2, 4))):
            kind = rng.choice(["text", "text", "table", "figure"])
            if kind == "text":
                y = (
                    _paragraph(
                        draw,
                        (left, y, left + column_width, min(height - 80, y + int(rng.integers(80, 220)))),
                        rng,
                        body,
                    )
                    + 20
                )
            elif kind == "table":
                h = int(rng.integers(100, 200))
                _table(draw, (left, y, left + column_width, y + h), rng, _font(12, index))
                y += h + 30
            else:
                h = int(rng.integers(160, 260))
                page.paste(_chart((column_width, h), rng), (left, y))
                draw.text((left, y + h + 4), f"Figure {index}.{column}: measured values", font=_font(11, index), fill=0)
                y += h + 40
            if y > height - 150:
                break
    draw.text((width // 2 - 10, height - 40), str(index + 1), font=body, fill=0)
    return page


def _letterbox(picture: Image.Image, size: int = LAYOUT_SIZE) -> np.ndarray:
    """Resize keeping the aspect ratio, pad with grey 114 to ``size`` square; [1, 3, size, size] in [0, 1]."""
    scale = min(size / picture.width, size / picture.height)
    resized = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return (np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255)[None]


def layout_pages(n: int, seed: int = 0) -> list[Feed]:
    """Return ``n`` rendered document pages for the YOLOv8 layout detector (input ``images``)."""
    return [{"images": _letterbox(_page(i, seed))} for i in range(n)]


def rec_lines(n: int, seed: int = 0, width: int = 320) -> list[Feed]:
    """Return ``n`` rendered text lines for PP-OCRv4 rec: [1, 3, 48, width], BGR scaled to [-1, 1], right-padded."""
    feeds = []
    for index in range(n):
        picture = _text_line(index + 1000, np.random.default_rng([seed, index, 3]))
        resized_w = min(width, math.ceil(48 * picture.width / picture.height))
        array = np.asarray(picture.resize((resized_w, 48), Image.Resampling.BILINEAR))
        bgr = array[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255
        padded = np.zeros((3, 48, width), dtype=np.float32)
        padded[:, :, :resized_w] = (bgr - 0.5) / 0.5
        feeds.append({"x": padded[None]})
    return feeds
