"""Synthetic captions: weighted concept lists x templates (x background phrases).

SynCLR builds captions from concepts (class names of ImageNet-1k and fine-grained sets) with
sampling weights per list, optionally adding a background. This module does the same without
a language model: a concept list is drawn by weight, a concept uniformly within it, a template
uniformly, and with probability ``background_prob`` a background phrase. Draws come from one
seeded generator in chunks, so the stream is deterministic under the seed.

The lists bound how many distinct captions can exist (:meth:`SyntheticSource.capacity`):
asking for more fails at once, before anything is drawn.

The built-in concept list is ImageNet-1k's class names as shipped by open_clip (read from its
source file, so this stage needs no torch).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stablerep import storage
from stablerep.captions.clean import normalise
from stablerep.config import SyntheticCaptionsConfig
from stablerep.errors import InputError

DATA_DIR = Path(__file__).parent / "data"
CHUNK = 8192
# Above this many texts, or (text, background) pairs, the capacity is not counted one by one:
# the product of the list sizes (an upper bound) is used, so the check stays within seconds.
COUNT_LIMIT = 1_000_000


def _open_clip_constant(module: str, constant: str) -> list[str]:
    """A list constant from an open_clip module, read from source without importing torch."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("builtin:imagenet1k needs the open_clip_torch package installed")
    source = Path(spec.submodule_search_locations[0]) / f"{module}.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == constant for t in targets):
            return list(ast.literal_eval(node.value))
    raise InputError(f"open_clip's {module}.py has no {constant}")


BUILTIN_CONCEPTS: dict[str, Callable[[], list[str]]] = {
    "imagenet1k": lambda: _open_clip_constant("zero_shot_metadata", "IMAGENET_CLASSNAMES"),
}


def _read_lines(uri: str) -> list[str]:
    text = storage.read_text(uri, what="a UTF-8 text file, one entry a line")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def load_list(uri: str, *, kind: str, builtin_file: str | None = None) -> list[str]:
    """Read a list (concepts, templates, backgrounds) from ``builtin[:name]`` or a URI."""
    if uri == "builtin" and builtin_file:
        items = _read_lines(str(DATA_DIR / builtin_file))
    elif uri.startswith("builtin:"):
        key = uri.split(":", 1)[1]
        if key not in BUILTIN_CONCEPTS:
            raise InputError(f"{uri}: unknown built-in {kind} list; known: "
                             + ", ".join(f"builtin:{k}" for k in BUILTIN_CONCEPTS))
        items = BUILTIN_CONCEPTS[key]()
    else:
        items = _read_lines(uri)
    if not items:
        raise InputError(f"{uri}: the {kind} list is empty")
    return items


def with_article(concept: str) -> str:
    """``concept`` with its indefinite article (``an apple``, ``a tench``)."""
    return ("an " if concept[:1].lower() in "aeiou" else "a ") + concept


@dataclass
class SyntheticSource:
    """Loaded lists and weights, ready to draw captions."""

    names: list[str]  # concept source names
    concepts: list[list[str]]  # one list per source
    weights: np.ndarray  # (num_sources,) normalised
    templates: list[str]
    backgrounds: list[str]
    background_prob: float

    @classmethod
    def from_config(cls, cfg: SyntheticCaptionsConfig) -> SyntheticSource:
        concepts = [load_list(c.uri, kind="concept") for c in cfg.concepts]
        templates = load_list(cfg.templates_uri, kind="template", builtin_file="templates.txt")
        for t in templates:
            if "{concept}" not in t and "{a_concept}" not in t:
                raise InputError(
                    f"{cfg.templates_uri}: template {t!r} has neither {{concept}} nor {{a_concept}}"
                )
        backgrounds = load_list(cfg.backgrounds_uri, kind="background",
                                builtin_file="backgrounds.txt")
        weights = np.array([c.weight for c in cfg.concepts], dtype=np.float64)
        return cls([c.name for c in cfg.concepts], concepts, weights / weights.sum(),
                   templates, backgrounds, cfg.background_prob)

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "concepts": {n: len(c) for n, c in zip(self.names, self.concepts, strict=True)},
            "weights": dict(zip(self.names, self.weights.round(6).tolist(), strict=True)),
            "templates": len(self.templates),
            "backgrounds": len(self.backgrounds),
            "background_prob": self.background_prob,
        }

    def capacity(self) -> int:
        """How many distinct captions (as dedupe sees them) the lists can produce.

        Captions are ``text`` or ``text, background``, where ``text`` is a concept put into a
        template. The distinct texts are counted one by one (two templates, or two concepts,
        may give the same text once normalised); each can go without a background (unless
        ``background_prob`` is 1) or with any distinct background (unless it is 0). When no
        text contains ``", "``, the ``", "`` before a background marks where the text ends, so
        (text, background) pairs give distinct captions and the product is exact; otherwise
        the captions are counted one by one. Beyond :data:`COUNT_LIMIT` items to count, the
        product of the distinct counts is returned: an upper bound, never below the truth.
        """
        concepts = {c for group in self.concepts for c in group}
        backgrounds = ({normalise(b) for b in self.backgrounds} if self.background_prob > 0
                       else set())
        bare = self.background_prob < 1
        if len(concepts) * len(self.templates) > COUNT_LIMIT:
            return len(concepts) * len(self.templates) * (len(backgrounds) + bare)
        texts = {normalise(self._caption(c, t, None)) for c in concepts for t in self.templates}
        if not any(", " in t for t in texts) or len(texts) * len(backgrounds) > COUNT_LIMIT:
            return len(texts) * (len(backgrounds) + bare)
        with_bg = {f"{t}, {b}" for t in texts for b in backgrounds}
        return len(with_bg | texts) if bare else len(with_bg)

    def capacity_text(self) -> str:
        """The capacity's factors, for messages."""
        concepts = len({c for group in self.concepts for c in group})
        parts = [f"{concepts:,} concepts", f"{len(self.templates):,} templates"]
        if self.background_prob > 0:
            parts.append(f"({len(self.backgrounds):,} backgrounds"
                         + (" + none)" if self.background_prob < 1 else ")"))
        return " x ".join(parts)

    def _caption(self, concept: str, template: str, background: str | None) -> str:
        text = template.replace("{a_concept}", with_article(concept))
        text = text.replace("{concept}", concept)
        return f"{text}, {background}" if background else text

    def draw(self, num_rows: int, seed: int) -> Iterator[tuple[str, str]]:
        """Yield ``num_rows`` (caption, source label) pairs, deterministic under ``seed``."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x53796E]))
        labels = [f"synthetic:{n}" for n in self.names]
        done = 0
        while done < num_rows:
            # Always draw whole chunks, so the stream is a fixed sequence whatever num_rows is.
            src = rng.choice(len(self.names), size=CHUNK, p=self.weights)  # (CHUNK,)
            pick = rng.random(CHUNK)  # (CHUNK,) position within the chosen concept list
            tpl = rng.integers(0, len(self.templates), size=CHUNK)  # (CHUNK,)
            bg_on = rng.random(CHUNK) < self.background_prob  # (CHUNK,)
            bg = rng.integers(0, len(self.backgrounds), size=CHUNK)  # (CHUNK,)
            n = min(CHUNK, num_rows - done)
            for i in range(n):
                concepts = self.concepts[src[i]]
                concept = concepts[int(pick[i] * len(concepts))]
                background = self.backgrounds[bg[i]] if bg_on[i] else None
                yield self._caption(concept, self.templates[tpl[i]], background), labels[src[i]]
            done += n


def check_capacity(cfg: SyntheticCaptionsConfig, num_captions: int) -> int:
    """Fail at once when ``num_captions`` exceeds what the lists can produce.

    Args:
        cfg: the synthetic source's config (its lists are loaded here).
        num_captions: the number of captions asked for.

    Returns:
        The capacity: the number of distinct captions the lists can produce.

    Raises:
        InputError: ``num_captions`` is above the capacity.
    """
    source = SyntheticSource.from_config(cfg)
    capacity = source.capacity()
    if num_captions > capacity:
        raise InputError(
            f"captions.num_captions: asked for {num_captions:,} captions, but the synthetic "
            f"source can make at most {capacity:,} distinct ones ({source.capacity_text()}); "
            "lower it, or raise the capacity with more concepts "
            "(captions.synthetic.concepts), templates (captions.synthetic.templates_uri) or "
            "backgrounds (captions.synthetic.backgrounds_uri)")
    return capacity


def synthetic_rows(cfg: SyntheticCaptionsConfig, num_rows: int, seed: int
                   ) -> tuple[Iterator[tuple[str, str]], dict]:
    """The first ``num_rows`` candidates of the seeded stream, and the source's description."""
    source = SyntheticSource.from_config(cfg)
    return source.draw(num_rows, seed), {**source.describe(), "rows": num_rows}
