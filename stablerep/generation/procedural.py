"""The ``procedural`` backend: digits and simple shapes rendered from grammar captions.

A fast stand-in for a diffusion model that makes the learning signal checkable, not a
substitute for one. The caption (grammar in :mod:`stablerep.captions.procedural`) fixes the
content -- which digit or shape, typeface or hand style, stroke weight, ink colour,
background texture and tone, size -- and the image's own seed (the per-image seed every
backend gets) draws everything the caption leaves open: rotation, position, exact scale,
aspect, slant, elastic stroke jitter, stroke thickness, edge softness, ink shade, background
shade and texture, and sensor noise. So images of one caption are positives that share the
class and differ in nuisances, the way StableRep's images of one caption do.

Rendering, per image:

1. A glyph *coverage mask* (side x side, floats in [0, 1]) with the figure's box centred and
   80% of the side tall: a DejaVu TrueType glyph (matplotlib ships the fonts; rendered with
   PIL and cached per caption-fixed settings) or strokes drawn from per-digit polylines (the
   ``handwritten`` style and ``hand-drawn`` shapes jitter their points per seed).
2. One resampling of the mask into the output (H, W): an affine map (rotation, scale, aspect,
   slant, translation) plus a smooth random displacement field (a few sinusoids), bilinear.
3. A soft threshold of the resampled coverage (thickness and edge softness from the seed),
   then ink over a background of the caption's texture and tone, plus Gaussian noise.

Deterministic per (caption, seed, size); pure numpy/PIL on the CPU (the device settings do
not apply). Bad captions raise :class:`~stablerep.errors.InputError` naming the caption and the
grammar.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stablerep.config import GenerateConfig
from stablerep.generation.work import WorkItem
from stablerep.procedural_grammar import (
    CLASS_NAMES,
    INKS,
    SIZES,
    TEXTURES,
    TONES,
    WEIGHTS,
    FigureSpec,
    parse_caption,
    procedural_label,
)

__all__ = ["CLASS_NAMES", "MODEL_ID", "ProceduralBackend", "draw_style", "parse_caption",
           "procedural_label", "render", "render_spec"]

MODEL_ID = "stablerep/procedural-v1"
GLYPH_FILL = 0.8  # the figure's box height as a fraction of the mask side

# DejaVu font files by (typeface, italic, bold).
_FONT_FILES = {
    "sans-serif": ("DejaVuSans", "Oblique"),
    "serif": ("DejaVuSerif", "Italic"),
    "monospace": ("DejaVuSansMono", "Oblique"),
}
SIZE_FRACTION = {"small": 0.45, "medium": 0.62, "large": 0.8}  # figure height / image height
HAND_WIDTH = {"thin": 0.055, "regular": 0.09, "bold": 0.14}  # stroke width / mask side
FONT_STROKE = {"thin": 0.0, "regular": 0.05, "bold": 0.06}  # outline stroke / mask side
THRESHOLD = {"thin": 0.45, "regular": 0.4, "bold": 0.35}  # coverage cut (lower = thicker)
OVERSAMPLE = 1.5  # mask pixels per output pixel at the nominal figure size
MIN_STROKE_PX = 3.5  # thinnest drawn stroke in mask pixels (about 2.3 output pixels)

INK_RGB = {
    "light": {"black": (20, 20, 20), "grey": (95, 95, 95), "red": (175, 30, 30),
              "green": (30, 120, 45), "blue": (35, 55, 175), "purple": (110, 40, 140),
              "brown": (110, 65, 30)},
    "dark": {"white": (240, 240, 240), "grey": (165, 165, 165), "red": (245, 90, 80),
             "green": (100, 220, 110), "blue": (110, 160, 255), "yellow": (240, 225, 70),
             "orange": (250, 160, 50)},
}
TONE_LEVEL = {"light": (175.0, 250.0), "dark": (0.0, 75.0)}  # background grey level range


# ---------------------------------------------------------------------------- strokes


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 14
         ) -> list[tuple[float, float]]:
    """Points on an ellipse arc from angle ``a0`` to ``a1`` degrees (y down: 90 = bottom)."""
    t = np.radians(np.linspace(a0, a1, n))
    return list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist(),
                    strict=True))


def _digit_strokes() -> dict[str, list[list[tuple[float, float]]]]:
    """Hand-style polylines per digit, in a unit box (x right, y down)."""
    return {
        "0": [_arc(0.5, 0.5, 0.27, 0.42, -100, 275, 24)],
        "1": [[(0.36, 0.22), (0.55, 0.08), (0.55, 0.92)]],
        "2": [_arc(0.5, 0.3, 0.25, 0.22, 200, 380) + [(0.22, 0.92), (0.8, 0.92)]],
        "3": [_arc(0.5, 0.29, 0.23, 0.21, 200, 450) + _arc(0.5, 0.71, 0.26, 0.21, 270, 520)],
        "4": [[(0.64, 0.92), (0.64, 0.08), (0.2, 0.66), (0.82, 0.66)]],
        "5": [[(0.76, 0.08), (0.3, 0.08), (0.28, 0.47)] + _arc(0.5, 0.66, 0.26, 0.25, 215, 520)],
        "6": [[(0.7, 0.1), (0.5, 0.12), (0.33, 0.3), (0.26, 0.55)]
              + _arc(0.5, 0.7, 0.24, 0.22, 180, 540, 24)],
        "7": [[(0.2, 0.1), (0.8, 0.1), (0.42, 0.92)]],
        "8": [_arc(0.5, 0.28, 0.2, 0.2, 90, 450, 20), _arc(0.5, 0.7, 0.25, 0.22, -90, 270, 20)],
        "9": [_arc(0.5, 0.3, 0.23, 0.22, 0, 360, 20) + [(0.7, 0.6), (0.55, 0.92)]],
    }


def _shape_outline(shape: str) -> list[list[tuple[float, float]]]:
    """Closed outlines of the shapes, in a unit box."""
    if shape == "circle":
        return [_arc(0.5, 0.5, 0.4, 0.4, 0, 360, 33)]
    if shape == "square":
        return [[(0.12, 0.1), (0.88, 0.1), (0.88, 0.9), (0.12, 0.9), (0.12, 0.1)]]
    if shape == "triangle":
        return [[(0.5, 0.1), (0.92, 0.9), (0.08, 0.9), (0.5, 0.1)]]
    return [[(0.5, 0.1), (0.5, 0.9)], [(0.1, 0.5), (0.9, 0.5)]]  # cross


_CROSS_FILL = [(0.36, 0.1), (0.64, 0.1), (0.64, 0.36), (0.9, 0.36), (0.9, 0.64), (0.64, 0.64),
               (0.64, 0.9), (0.36, 0.9), (0.36, 0.64), (0.1, 0.64), (0.1, 0.36), (0.36, 0.36)]
DIGIT_STROKES = _digit_strokes()


def _to_mask_px(points: np.ndarray, side: int) -> list[tuple[float, float]]:
    """Unit-box points (n, 2) -> mask pixels, the box's height GLYPH_FILL of the side."""
    px = (points - 0.5) * (GLYPH_FILL * side) + side / 2  # (n, 2)
    return [tuple(p) for p in px.tolist()]


def _draw_strokes(strokes: list[list[tuple[float, float]]], side: int, width: float,
                  rng: np.random.Generator | None, *, fill: bool = False) -> np.ndarray:
    """Strokes (jittered when ``rng`` is given) drawn into a (side, side) coverage mask."""
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    shift = rng.normal(0, 0.02, size=2) if rng is not None else np.zeros(2)  # whole-stroke drift
    line = max(MIN_STROKE_PX, width * side)  # mask pixels
    for stroke in strokes:
        pts = np.asarray(stroke, dtype=np.float64)  # (n, 2)
        closed = len(pts) > 2 and np.allclose(pts[0], pts[-1])
        if rng is not None:
            pts = pts + rng.normal(0, 0.018, size=pts.shape) + shift
            shift = rng.normal(0, 0.02, size=2)
            if closed:
                pts[-1] = pts[0]  # a jittered outline still closes
        xy = _to_mask_px(pts, side)
        if fill:
            draw.polygon(xy, fill=255)
        else:
            draw.line(xy, fill=255, width=round(line), joint="curve")
            r = line / 2  # round caps
            for x, y in (xy[0], xy[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return _soften(image, side)


def _soften(image: Image.Image, side: int) -> np.ndarray:
    """Blur a binary-ish mask slightly so thresholds can thin or thicken it smoothly."""
    blurred = image.filter(ImageFilter.GaussianBlur(radius=0.5 * OVERSAMPLE))
    return np.asarray(blurred, dtype=np.float32) / 255.0  # (side, side)


# ---------------------------------------------------------------------------- fonts


def font_path(typeface: str, *, italic: bool, bold: bool) -> Path:
    """The matplotlib-shipped DejaVu file for a typeface and its variant.

    Args:
        typeface: sans-serif, serif or monospace.
        italic: the Oblique (Italic for serif) variant.
        bold: the Bold variant.
    """
    import matplotlib

    family, slant = _FONT_FILES[typeface]
    suffix = ("Bold" if bold else "") + (slant if italic else "")
    name = f"{family}-{suffix}.ttf" if suffix else f"{family}.ttf"
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@functools.lru_cache(maxsize=1024)
def font_glyph(typeface: str, italic: bool, weight: str, char: str, side: int) -> np.ndarray:
    """A TrueType glyph as a (side, side) coverage mask (read-only, cached).

    ``thin`` is the regular file as is, ``regular`` adds a thin outline stroke, ``bold`` is the
    Bold file with a wider one (the glyph is drawn at twice the side, then scaled down).

    Args:
        typeface: sans-serif, serif or monospace.
        italic: the slanted variant of the typeface.
        weight: thin, regular or bold.
        char: the character to draw.
        side: the mask's side in pixels; the glyph's box is GLYPH_FILL of it tall.
    """
    bold = weight == "bold"
    font = ImageFont.truetype(str(font_path(typeface, italic=italic, bold=bold)), size=2 * side)
    canvas = Image.new("L", (4 * side, 4 * side), 0)
    stroke = round(side * FONT_STROKE[weight])
    ImageDraw.Draw(canvas).text((side, side // 2), char, fill=255, font=font,
                                stroke_width=stroke, stroke_fill=255)
    box = canvas.getbbox()
    glyph = canvas.crop(box)
    height = round(GLYPH_FILL * side)
    width = min(side, max(1, round(glyph.width * height / glyph.height)))
    glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
    mask = Image.new("L", (side, side), 0)
    mask.paste(glyph, ((side - width) // 2, (side - height) // 2))
    out = _soften(mask, side)
    out.flags.writeable = False
    return out


# ---------------------------------------------------------------------------- geometry


def _coverage(spec: FigureSpec, side: int, rng: np.random.Generator) -> np.ndarray:
    """The figure's (side, side) coverage mask before warping."""
    if spec.is_digit and spec.style != "handwritten":
        return font_glyph(spec.style, spec.italic, spec.weight, spec.figure, side)
    width = HAND_WIDTH[spec.weight] * rng.uniform(0.8, 1.25)
    if spec.is_digit:
        return _draw_strokes(DIGIT_STROKES[spec.figure], side, width, rng)
    jitter = rng if spec.style == "hand-drawn" else None
    if spec.style == "filled":
        outline = [_CROSS_FILL] if spec.figure == "cross" else _shape_outline(spec.figure)
        return _draw_strokes(outline, side, width, None, fill=True)
    return _draw_strokes(_shape_outline(spec.figure), side, width, jitter)


@functools.lru_cache(maxsize=16)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of every output pixel, (H, W) float32 each (read-only)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _source_coords(spec: FigureSpec, side: int, height: int, width: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask coordinates (rows, cols), each (height, width), sampled by every output pixel."""
    frac = SIZE_FRACTION[spec.size] * rng.uniform(0.88, 1.12)
    scale = frac * height / (GLYPH_FILL * side)  # output px per mask px
    angle = np.radians(rng.normal(0, 9))
    slant = rng.normal(0, 0.12) + (0.22 if spec.italic and spec.style == "handwritten" else 0)
    aspect = rng.uniform(0.85, 1.15)
    # forward map (mask, centred) -> (output, centred): scale * R(angle) @ shear @ diag(aspect, 1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, -slant], [0.0, 1.0]])
    forward = scale * rot @ shear @ np.diag([aspect, 1.0])  # (2, 2) on (x, y)
    inverse = np.linalg.inv(forward)
    room = np.clip((1 - frac) / 2, 0.02, None) * 0.8
    cx = width / 2 + rng.uniform(-room, room) * width
    cy = height / 2 + rng.uniform(-room, room) * height
    ys, xs = _pixel_grid(height, width)  # (H, W) each
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    mx = inverse[0, 0] * dx + inverse[0, 1] * dy + side / 2 - 0.5  # (H, W)
    my = inverse[1, 0] * dx + inverse[1, 1] * dy + side / 2 - 0.5  # (H, W)
    u, v = xs / width, ys / height
    for target in (mx, my):  # elastic jitter: two random plane waves per axis
        for _ in range(2):
            fx, fy = rng.uniform(-2.0, 2.0, size=2)
            amp = rng.uniform(0.005, 0.03) * side
            target += amp * np.sin(2 * np.pi * (fx * u + fy * v) + rng.uniform(0, 2 * np.pi))
    return my, mx


def _bilinear(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``mask`` sampled at fractional (rows, cols), zero outside: (H, W)."""
    side = mask.shape[0]
    padded = np.pad(mask, 1)  # (side + 2, side + 2): zeros around
    edge = side + 0.999  # beyond the mask: read the zero border
    r = np.clip(rows + 1, 0, edge)
    c = np.clip(cols + 1, 0, edge)
    r0, c0 = np.floor(r).astype(np.intp), np.floor(c).astype(np.intp)
    fr, fc = r - r0, c - c0
    top = padded[r0, c0] * (1 - fc) + padded[r0, c0 + 1] * fc
    bottom = padded[r0 + 1, c0] * (1 - fc) + padded[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


# ---------------------------------------------------------------------------- colour


def _background(spec: FigureSpec, height: int, width: int, rng: np.random.Generator
                ) -> np.ndarray:
    """The background (H, W, 3) float32 in 0..255 for the caption's texture and tone."""
    low, high = TONE_LEVEL[spec.tone]
    base = rng.uniform(low, high) + rng.normal(0, 8, size=3)  # (3,) a slight tint
    bg = np.empty((height, width, 3), dtype=np.float32)
    bg[:] = base
    if spec.texture == "noisy":
        bg += rng.uniform(12, 30) * rng.standard_normal((height, width, 1), dtype=np.float32)
    elif spec.texture == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        ys, xs = _pixel_grid(height, width)
        ramp = (np.cos(theta) * xs / width + np.sin(theta) * ys / height)  # (H, W)
        ramp = (ramp - ramp.mean()) / max(np.ptp(ramp), 1e-6)
        bg += (rng.uniform(40, 80) * ramp)[..., None]
    elif spec.texture == "mottled":
        cells = rng.normal(0, 1, size=(rng.integers(3, 7), rng.integers(3, 7))).astype(np.float32)
        blobs = np.asarray(Image.fromarray(cells, mode="F").resize(
            (width, height), Image.Resampling.BICUBIC))  # (H, W)
        bg += (rng.uniform(15, 30) * blobs)[..., None]
    lo, hi = (150.0, 255.0) if spec.tone == "light" else (0.0, 110.0)
    return np.clip(bg, lo, hi)


def _ink(spec: FigureSpec, rng: np.random.Generator) -> np.ndarray:
    rgb = np.asarray(INK_RGB[spec.tone][spec.ink], dtype=np.float32)
    return np.clip(rgb + rng.normal(0, 12, size=3), 0, 255)  # (3,)


# ---------------------------------------------------------------------------- rendering


def mask_side(size: str, height: int) -> int:
    """The coverage mask's side: the figure's output height times OVERSAMPLE (24..512)."""
    return int(np.clip(round(SIZE_FRACTION[size] * height / GLYPH_FILL * OVERSAMPLE), 24, 512))


def draw_style(spec: FigureSpec, seed: int) -> FigureSpec:
    """Fill the drawing style a figure-only caption leaves open, from the image's seed.

    Its own random stream (seed, "STYL"), so the nuisances drawn afterwards from ``seed`` are
    those a caption naming the same style would get.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5354594C]))
    tone = TONES[rng.integers(len(TONES))]
    return dataclasses.replace(
        spec, weight=WEIGHTS[rng.integers(len(WEIGHTS))], tone=tone,
        ink=INKS[tone][rng.integers(len(INKS[tone]))],
        texture=TEXTURES[rng.integers(len(TEXTURES))], size=SIZES[rng.integers(len(SIZES))])


def render_spec(spec: FigureSpec, seed: int, height: int, width: int) -> np.ndarray:
    """Render one parsed caption: (height, width, 3) uint8, deterministic per arguments.

    Args:
        spec: the parsed caption.
        seed: the image's seed (chooses every nuisance the caption leaves open).
        height: output height in pixels.
        width: output width in pixels.
    """
    if not spec.styled:
        spec = draw_style(spec, seed)
    rng = np.random.default_rng(seed)
    side = mask_side(spec.size, height)
    mask = _coverage(spec, side, rng)  # (side, side)
    rows, cols = _source_coords(spec, side, height, width, rng)
    cover = _bilinear(mask, rows, cols)  # (H, W)
    cut = THRESHOLD[spec.weight] + rng.uniform(-0.08, 0.08)
    gain = rng.uniform(3.0, 8.0)
    alpha = np.clip((cover - cut) * gain + 0.5, 0.0, 1.0)[..., None]  # (H, W, 1)
    image = _background(spec, height, width, rng) * (1 - alpha) + _ink(spec, rng) * alpha
    image += rng.uniform(0, 8) * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render(caption: str, seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """Render one caption of the procedural grammar: (height, width, 3) uint8.

    Args:
        caption: a caption in the grammar of :mod:`stablerep.captions.procedural`.
        seed: the image's seed.
        height: output height in pixels.
        width: output width in pixels.

    Raises:
        InputError: the caption is not in the grammar.
    """
    return render_spec(parse_caption(caption), seed, height, width)


class ProceduralBackend:
    """The :class:`~stablerep.generation.backends.Backend` that renders grammar captions.

    Args:
        cfg: generation settings; only ``height`` and ``width`` apply.
    """

    model_id = MODEL_ID

    def __init__(self, cfg: GenerateConfig):
        self.height, self.width = cfg.height, cfg.width

    def generate(self, items: list[WorkItem]) -> np.ndarray:
        """Render one image per item: (len(items), H, W, 3) uint8."""
        specs = {it.caption: parse_caption(it.caption) for it in items}
        images = [render_spec(specs[it.caption], it.seed, self.height, self.width)
                  for it in items]
        return np.stack(images) if images else np.zeros((0, self.height, self.width, 3),
                                                        dtype=np.uint8)
