"""The procedural caption grammar: captions that fix a digit or shape and how it is drawn.

The ``procedural`` text-to-image backend (:mod:`stablerep.generation.procedural`) renders
these captions; this module owns the grammar (vocabulary, parsing, formatting, class labels)
and the caption source ``captions.source: procedural`` that draws grammar captions.

Grammar (lower case, single spaces, the commas as shown; the article agrees with the next
word, ``a`` or ``an``)::

    caption    := article figure [", " weight " " ink " ink on a " texture " " tone
                  " background, " size]
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
``an outlined triangle, thin yellow ink on a plain dark background, large``, or the figure
alone, ``a serif digit 3`` (``captions.procedural.style_prob`` is the chance of the style
clause; a caption without it leaves weight, ink, background and size to each image's seed, the
way a short prompt leaves them to a diffusion model's noise). The figure is the
class: digits 0-9 are labels 0-9 and the shapes follow (circle 10 ... cross 13), see
:data:`CLASS_NAMES` and :func:`procedural_label`. Everything else in the caption is a
nuisance the caption fixes; what the caption leaves open (pose, position, exact scale,
slant, stroke jitter, background texture, noise) the image's seed chooses.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from stablerep.config import ProceduralCaptionsConfig
from stablerep.errors import InputError
from stablerep.procedural_grammar import (
    CLASS_NAMES,
    DIGITS,
    GRAMMAR,
    INKS,
    SHAPE_STYLES,
    SHAPES,
    SIZES,
    TEXTURES,
    TONES,
    TYPEFACES,
    WEIGHTS,
    FigureSpec,
    format_caption,
    parse_caption,
    procedural_label,
)

__all__ = ["CLASS_NAMES", "DIGITS", "GRAMMAR", "INKS", "SHAPES", "SHAPE_STYLES", "SIZES", "TEXTURES", "TONES", "TYPEFACES", "WEIGHTS", "FigureSpec", "format_caption", "parse_caption", "procedural_label", "capacity", "check_capacity", "draw_captions", "procedural_rows"]


# ---------------------------------------------------------------------------- caption source

CHUNK = 8192


def _classes(cfg: ProceduralCaptionsConfig) -> tuple[str, ...]:
    return CLASS_NAMES if cfg.shapes else DIGITS


def _draw_spec(cfg: ProceduralCaptionsConfig, figure: str, u: np.ndarray, styled: bool = True
               ) -> FigureSpec:
    """A spec for ``figure`` from 7 uniform numbers ``u`` in [0, 1); style open unless styled."""

    def choose(options, x: float):
        return options[int(x * len(options))]

    tone = choose(_allowed(TONES, cfg.tones), u[4])
    if figure in DIGITS:
        style, italic = choose(cfg.typefaces, u[0]), bool(u[1] < cfg.italic_prob)
    else:
        style, italic = choose(SHAPE_STYLES, u[0]), False
    if not styled:
        return FigureSpec(figure, style, italic)
    return FigureSpec(figure, style, italic, choose(_allowed(WEIGHTS, cfg.weights), u[2]),
                      choose(_allowed(INKS[tone], cfg.inks), u[5]),
                      choose(_allowed(TEXTURES, cfg.textures), u[3]), tone,
                      choose(_allowed(SIZES, cfg.sizes), u[6]))


def _allowed(vocabulary: tuple[str, ...], chosen: list[str]) -> tuple[str, ...]:
    """The words of ``vocabulary`` that the config keeps, in the grammar's order."""
    return tuple(w for w in vocabulary if w in chosen)


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
        # drawn only below 1, so style_prob 1 keeps the stream of captions it always had
        styled = rng.random(CHUNK) < cfg.style_prob if cfg.style_prob < 1 else None  # (CHUNK,)
        n = min(CHUNK, num_rows - done)
        for i in range(n):
            name = classes[figure[i]]
            spec = _draw_spec(cfg, name, slots[i], styled is None or bool(styled[i]))
            yield format_caption(spec), f"procedural:{name}"
        done += n


def capacity(cfg: ProceduralCaptionsConfig) -> int:
    """How many distinct captions the grammar can produce under ``cfg``.

    A figure is a digit in each configured typeface, italic or not (only one of the two at
    italic_prob 0 or 1), or a shape in each of its drawing styles. With the style clause
    (style_prob > 0) every figure takes each weight, ink (per background tone), texture and
    size; without it (style_prob < 1) the figure alone is one more caption.
    """
    inks = sum(len(_allowed(INKS[tone], cfg.inks)) for tone in _allowed(TONES, cfg.tones))
    styles = (len(set(cfg.weights)) * inks * len(set(cfg.textures)) * len(set(cfg.sizes)))
    per_figure = (styles if cfg.style_prob > 0 else 0) + (1 if cfg.style_prob < 1 else 0)
    italic = 1 if cfg.italic_prob in (0.0, 1.0) else 2
    figures = len(DIGITS) * len(set(cfg.typefaces)) * italic
    figures += len(SHAPES) * len(SHAPE_STYLES) if cfg.shapes else 0
    return figures * per_figure


def check_capacity(cfg: ProceduralCaptionsConfig, num_captions: int) -> int:
    """Fail at once when ``num_captions`` exceeds :func:`capacity`; returns the capacity."""
    most = capacity(cfg)
    if num_captions > most:
        raise InputError(f"captions.num_captions: asked for {num_captions:,} captions, but the "
                         f"procedural grammar can make at most {most:,} distinct ones with these "
                         "settings (captions.procedural: shapes, typefaces, italic_prob, style_prob and the style vocabularies); lower "
                         "it, or draw several images per caption instead")
    return most


def procedural_rows(cfg: ProceduralCaptionsConfig, num_rows: int, seed: int
                    ) -> tuple[Iterator[tuple[str, str]], dict]:
    """The first ``num_rows`` candidates of the seeded stream, and the source's description."""
    described = {"kind": "procedural", "classes": list(_classes(cfg)),
                 "typefaces": list(cfg.typefaces), "italic_prob": cfg.italic_prob,
                 "style_prob": cfg.style_prob, "weights": list(cfg.weights),
                 "inks": list(cfg.inks), "textures": list(cfg.textures),
                 "tones": list(cfg.tones), "sizes": list(cfg.sizes),
                 "rows": num_rows}
    return draw_captions(cfg, num_rows, seed), described
