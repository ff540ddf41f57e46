"""The procedural caption grammar, shared by the caption source and the procedural backend.

The caption stage draws captions in this grammar (:mod:`stablerep.captions.procedural`) and
the ``procedural`` text-to-image backend (:mod:`stablerep.generation.procedural`) renders
them; both read the vocabulary, parsing, formatting and class labels from here, so neither
stage imports the other. The grammar is described in :mod:`stablerep.captions.procedural`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
           "'a <hand-drawn|outlined|filled> <circle|square|triangle|cross>', alone or followed "
           "by ', <thin|regular|bold> <ink> ink on a <plain|noisy|gradient|mottled> <light|dark> "
           "background, <small|medium|large>' (inks on light: black grey red green blue purple "
           "brown; on dark: white grey red green blue yellow orange)")
"""The grammar in one line, quoted by every parse error."""


@dataclass(frozen=True)
class FigureSpec:
    """What a procedural caption fixes about its image.

    A caption that names only its figure (``a serif digit 3``) leaves the drawing style open:
    ``weight`` ... ``size`` are None and each image draws them from its own seed.
    """

    figure: str  # a digit "0".."9" or a shape name
    style: str  # a typeface (digits) or a shape style (shapes)
    italic: bool  # digits only
    weight: str | None = None  # None (with the four below) = left to each image's seed
    ink: str | None = None
    texture: str | None = None
    tone: str | None = None
    size: str | None = None

    @property
    def label(self) -> int:
        """The class label: the digit's value, or 10 + the shape's index."""
        return CLASS_NAMES.index(self.figure)

    @property
    def is_digit(self) -> bool:
        return self.figure in DIGITS

    @property
    def styled(self) -> bool:
        """True when the caption names the drawing style (weight, ink, background, size)."""
        return self.weight is not None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def format_caption(spec: FigureSpec) -> str:
    """The caption of ``spec`` in the grammar (the inverse of :func:`parse_caption`)."""
    if spec.is_digit:
        figure = ("italic " if spec.italic else "") + f"{spec.style} digit {spec.figure}"
    else:
        figure = f"{spec.style} {spec.figure}"
    if not spec.styled:
        return f"{_article(figure)} {figure}"
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
    if len(clauses) not in (1, 3):
        raise _bad(caption, f"expected 1 or 3 comma-separated clauses, got {len(clauses)}")
    words = clauses[0].split(" ")
    if words[0] not in ("a", "an"):
        raise _bad(caption, "the caption must start with 'a' or 'an'")
    figure, style, italic = _parse_figure(caption, words[1:])
    if len(clauses) == 1:  # the figure alone: every image draws its own style
        spec = FigureSpec(figure, style, italic)
    else:
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
