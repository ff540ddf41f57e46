"""The procedural caption grammar: captions that fix a digit or shape and how it is drawn.

The ``procedural`` text-to-image backend (:mod:`stablerep.generation.procedural`) renders
these captions; this module owns the grammar (vocabulary, parsing, formatting, class labels)
and the caption source ``captions.source: procedural`` that draws grammar captions.

Grammar (lower case, single spaces, the commas as shown; the article agrees with the next
word, ``a`` or ``an``)::

    caption    := article figure ", " weight " " ink " ink on a " texture " " tone
                  " background, " size
    figure     := ["italic "] typeface " digit " DIGIT  |  shape_style " " SHAPE
    typeface   := handwritten | sans-serif | serif | monospace
    DIGIT      := 0 | 1 | ... | 9
    shape_style:= hand-drawn | outlined | filled
    SHAPE      := circle | square | triangle | cross
    weight     := thin | regular | bold
    ink        := black | grey | red | green | blue | purple | brown       (light tone)
                | white | grey | red | green | blue | yellow | orange      (dark tone)
    texture    := plain | noisy | gradient | mottled
    tone       := light | dark
    size       := small | medium | large

For example ``a handwritten digit 7, bold red ink on a noisy light background, small`` or
``an outlined triangle, thin yellow ink on a plain dark background, large``. The figure is the
class: digits 0-9 are labels 0-9 and the shapes follow (circle 10 ... cross 13), see
:data:`CLASS_NAMES` and :func:`procedural_label`. Everything else in the caption is a
nuisance the caption fixes; what the caption leaves open (pose, position, exact scale,
slant, stroke jitter, background texture, noise) the image's seed chooses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stablerep.config import ProceduralCaptionsConfig
from stablerep.errors import InputError

DIGITS = tuple(str(d) for d in range(10))
SHAPES = ("circle", "square", "triangle", "cross")
CLASS_NAMES: tuple[str, ...] = DIGITS + SHAPES
"""Class label ``i`` is ``CLASS_NAMES[i]``: the digits 0-9, then the shapes."""
TYPEFACES = ("handwritten", "sans-serif", "serif", "monospace")
SHAPE_STYLES = ("hand-drawn", "outlined", "filled")
WEIGHTS = ("thin", "regular", "bold")
TONES = ("light", "dark")
INKS: dict[str, tuple[str, ...]] = {
    "light": ("black", "grey", "red", "green", "blue", "purple", "brown"),
    "dark": ("white", "grey", "red", "green", "blue", "yellow", "orange"),
}
"""Ink colours allowed on each background tone (each contrasts with it)."""
TEXTURES = ("plain", "noisy", "gradient", "mottled")
SIZES = ("small", "medium", "large")

GRAMMAR = ("'a [italic] <handwritten|sans-serif|serif|monospace> digit <0-9>' or "
           "'a <hand-drawn|outlined|filled> <circle|square|triangle|cross>', then "
           "', <thin|regular|bold> <ink> ink on a <plain|noisy|gradient|mottled> <light|dark> "
           "background, <small|medium|large>' (inks on light: black grey red green blue purple "
           "brown; on dark: white grey red green blue yellow orange)")
"""The grammar in one line, quoted by every parse error."""


@dataclass(frozen=True)
class FigureSpec:
    """What a procedural caption fixes about its image."""

    figure: str  # a digit "0".."9" or a shape name
    style: str  # a typeface (digits) or a shape style (shapes)
    italic: bool  # digits only
    weight: str
    ink: str
    texture: str
    tone: str
    size: str

    @property
    def label(self) -> int:
        """The class label: the digit's value, or 10 + the shape's index."""
        return CLASS_NAMES.index(self.figure)

    @property
    def is_digit(self) -> bool:
        return self.figure in DIGITS


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def format_caption(spec: FigureSpec) -> str:
    """The caption of ``spec`` in the grammar (the inverse of :func:`parse_caption`)."""
    if spec.is_digit:
        figure = ("italic " if spec.italic else "") + f"{spec.style} digit {spec.figure}"
    else:
        figure = f"{spec.style} {spec.figure}"
    return (f"{_article(figure)} {figure}, {spec.weight} {spec.ink} ink on a {spec.texture} "
            f"{spec.tone} background, {spec.size}")


def _bad(caption: str, what: str) -> InputError:
    return InputError(f"caption {caption!r}: {what}; expected the procedural grammar {GRAMMAR}")


def _pick(caption: str, word: str, allowed: tuple[str, ...], slot: str) -> str:
    if word not in allowed:
        raise _bad(caption, f"{slot} {word!r} is not one of {', '.join(allowed)}")
    return word


def _parse_figure(caption: str, words: list[str]) -> tuple[str, str, bool]:
    """(figure, style, italic) from the words of the first clause, article removed."""
    italic = bool(words) and words[0] == "italic"
    rest = words[1:] if italic else words
    if len(rest) == 3 and rest[1] == "digit":
        style = _pick(caption, rest[0], TYPEFACES, "typeface")
        return _pick(caption, rest[2], DIGITS, "digit"), style, italic
    if len(rest) == 2 and not italic:
        style = _pick(caption, rest[0], SHAPE_STYLES, "shape style")
        return _pick(caption, rest[1], SHAPES, "shape"), style, False
    raise _bad(caption, "the figure must be '[italic] <typeface> digit <0-9>' or "
                        "'<shape style> <shape>'")


def _parse_ink(caption: str, text: str) -> tuple[str, str, str, str]:
    """(weight, ink, texture, tone) from the middle clause."""
    words = text.split(" ")
    if len(words) != 8 or words[2:5] != ["ink", "on", "a"] or words[7] != "background":
        raise _bad(caption, "the second clause must be '<weight> <ink> ink on a <texture> "
                            "<tone> background'")
    weight = _pick(caption, words[0], WEIGHTS, "weight")
    texture = _pick(caption, words[5], TEXTURES, "background texture")
    tone = _pick(caption, words[6], TONES, "background tone")
    ink = _pick(caption, words[1], INKS[tone], f"ink colour on a {tone} background")
    return weight, ink, texture, tone


def parse_caption(caption: str) -> FigureSpec:
    """Parse a procedural caption strictly.

    Args:
        caption: a caption in the grammar of this module's docstring.

    Returns:
        The parsed :class:`FigureSpec`.

    Raises:
        InputError: the caption is not in the grammar; the message names the caption, the
            part that does not fit, and the grammar.
    """
    if not isinstance(caption, str):
        raise _bad(str(caption), "not a string")
    clauses = caption.split(", ")
    if len(clauses) != 3:
        raise _bad(caption, f"expected 3 comma-separated clauses, got {len(clauses)}")
    words = clauses[0].split(" ")
    if words[0] not in ("a", "an"):
        raise _bad(caption, "the caption must start with 'a' or 'an'")
    figure, style, italic = _parse_figure(caption, words[1:])
    weight, ink, texture, tone = _parse_ink(caption, clauses[1])
    size = _pick(caption, clauses[2], SIZES, "size")
    spec = FigureSpec(figure, style, italic, weight, ink, texture, tone, size)
    canonical = format_caption(spec)
    if canonical != caption:
        raise _bad(caption, f"did you mean {canonical!r}")
    return spec


def procedural_label(caption: str) -> int:
    """The class label (0-9 digits, 10-13 shapes) of a procedural caption.

    Raises:
        InputError: the caption is not in the grammar.
    """
    return parse_caption(caption).label


# ---------------------------------------------------------------------------- caption source

CHUNK = 8192


def _classes(cfg: ProceduralCaptionsConfig) -> tuple[str, ...]:
    return CLASS_NAMES if cfg.shapes else DIGITS


def _draw_spec(cfg: ProceduralCaptionsConfig, figure: str, u: np.ndarray) -> FigureSpec:
    """A spec for ``figure`` from 7 uniform numbers ``u`` in [0, 1)."""

    def choose(options, x: float):
        return options[int(x * len(options))]

    tone = choose(TONES, u[4])
    if figure in DIGITS:
        style, italic = choose(cfg.typefaces, u[0]), bool(u[1] < cfg.italic_prob)
    else:
        style, italic = choose(SHAPE_STYLES, u[0]), False
    return FigureSpec(figure, style, italic, choose(WEIGHTS, u[2]), choose(INKS[tone], u[5]),
                      choose(TEXTURES, u[3]), tone, choose(SIZES, u[6]))


def draw_captions(cfg: ProceduralCaptionsConfig, num_rows: int, seed: int
                  ) -> Iterator[tuple[str, str]]:
    """Yield ``num_rows`` (caption, source label) pairs, deterministic under ``seed``.

    Classes are drawn uniformly, every other slot uniformly within its vocabulary. The source
    label is ``procedural:<class name>`` (``procedural:7``, ``procedural:circle``).

    Args:
        cfg: which classes and typefaces, and how often digits are italic.
        num_rows: how many candidates to yield (duplicates are possible).
        seed: the stream's seed; the first n rows do not depend on ``num_rows``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x50524F43]))
    classes = _classes(cfg)
    done = 0
    while done < num_rows:
        # Whole chunks, so the stream is one fixed sequence whatever num_rows is.
        figure = rng.integers(0, len(classes), size=CHUNK)  # (CHUNK,)
        slots = rng.random((CHUNK, 7))  # (CHUNK, 7)
        n = min(CHUNK, num_rows - done)
        for i in range(n):
            name = classes[figure[i]]
            yield format_caption(_draw_spec(cfg, name, slots[i])), f"procedural:{name}"
        done += n


def capacity(cfg: ProceduralCaptionsConfig) -> int:
    """How many distinct captions the grammar can produce under ``cfg``.

    Every class takes each weight, ink (per background tone), texture and size; a digit also
    each configured typeface, italic or not (only one of the two at italic_prob 0 or 1); a
    shape each of its drawing styles.
    """
    rest = len(WEIGHTS) * sum(len(v) for v in INKS.values()) * len(TEXTURES) * len(SIZES)
    italic = 1 if cfg.italic_prob in (0.0, 1.0) else 2
    digits = len(DIGITS) * len(set(cfg.typefaces)) * italic * rest
    return digits + (len(SHAPES) * len(SHAPE_STYLES) * rest if cfg.shapes else 0)


def check_capacity(cfg: ProceduralCaptionsConfig, num_captions: int) -> int:
    """Fail at once when ``num_captions`` exceeds :func:`capacity`; returns the capacity."""
    most = capacity(cfg)
    if num_captions > most:
        raise InputError(f"captions.num_captions: asked for {num_captions:,} captions, but the "
                         f"procedural grammar can make at most {most:,} distinct ones with these "
                         "settings (captions.procedural: shapes, typefaces, italic_prob); lower "
                         "it, or draw several images per caption instead")
    return most


def procedural_rows(cfg: ProceduralCaptionsConfig, num_rows: int, seed: int
                    ) -> tuple[Iterator[tuple[str, str]], dict]:
    """The first ``num_rows`` candidates of the seeded stream, and the source's description."""
    described = {"kind": "procedural", "classes": list(_classes(cfg)),
                 "typefaces": list(cfg.typefaces), "italic_prob": cfg.italic_prob,
                 "rows": num_rows}
    return draw_captions(cfg, num_rows, seed), described
