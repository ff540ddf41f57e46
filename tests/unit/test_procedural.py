"""The procedural grammar, caption source and backend: parsing (and its errors), determinism
per (caption, seed), variety across seeds, the generation size, and that the rendered classes
are told apart by a nearest-centroid classifier on a handful of renders -- on renders and on
scikit-learn's real handwritten digits. Pure CPU, a few seconds; the CLI end to end is in
tests/integration/test_procedural_stage.py.
"""

from __future__ import annotations

import collections
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from stablerep.captions import make_captions
from stablerep.captions.procedural import (
    CLASS_NAMES,
    DIGITS,
    INKS,
    SHAPES,
    FigureSpec,
    draw_captions,
    format_caption,
    parse_caption,
    procedural_label,
)
from stablerep.config import (
    CaptionsConfig,
    Config,
    GenerateConfig,
    ProceduralCaptionsConfig,
    from_dict,
)
from stablerep.contracts import load_captions_manifest
from stablerep.errors import ConfigError, InputError
from stablerep.generation.backends import create_backend
from stablerep.generation.procedural import MODEL_ID, ProceduralBackend, font_path, render
from stablerep.generation.work import WorkItem

EXAMPLE = "a handwritten digit 7, bold red ink on a noisy light background, small"


def _captions(n: int, seed: int = 0, **cfg) -> list[str]:
    return [c for c, _ in draw_captions(ProceduralCaptionsConfig(**cfg), n, seed)]


# ---------------------------------------------------------------------------- grammar


def test_example_caption_parses() -> None:
    spec = parse_caption(EXAMPLE)
    assert spec == FigureSpec("7", "handwritten", False, "bold", "red", "noisy", "light", "small")
    assert spec.label == 7 and procedural_label(EXAMPLE) == 7


def test_shapes_follow_the_digits_as_labels() -> None:
    labels = [procedural_label(f"a filled {s}, thin yellow ink on a plain dark background, large")
              for s in SHAPES]
    assert labels == [10, 11, 12, 13]
    assert CLASS_NAMES[10:] == SHAPES and CLASS_NAMES[:10] == DIGITS


def test_drawn_captions_round_trip() -> None:
    captions = _captions(500)
    for caption in captions:
        assert format_caption(parse_caption(caption)) == caption
    assert any(c.startswith("an italic ") for c in captions)
    assert any(c.startswith("an outlined ") for c in captions)


@pytest.mark.parametrize(("caption", "part"), [
    ("a photo of a dog", "the figure must be '[italic] <typeface> digit <0-9>'"),
    ("a serif digit 3, bold", "expected 1 or 3 comma-separated clauses, got 2"),
    ("a handwritten digit 12, bold red ink on a noisy light background, small",
     "digit '12' is not one of 0, 1"),
    ("a comic digit 7, bold red ink on a noisy light background, small",
     "typeface 'comic' is not one of handwritten, sans-serif, serif, monospace"),
    ("a handwritten digit 7, bold black ink on a noisy dark background, small",
     "ink colour on a dark background 'black' is not one of white"),
    ("a handwritten digit 7, heavy red ink on a noisy light background, small",
     "weight 'heavy' is not one of thin, regular, bold"),
    ("a handwritten digit 7, bold red ink on a noisy light background, huge",
     "size 'huge' is not one of small, medium, large"),
    ("a handwritten digit 7, bold red ink on a striped light background, small",
     "background texture 'striped' is not one of plain"),
    ("a handwritten digit 7, bold red paint on a noisy light background, small",
     "the second clause must be"),
    ("an handwritten digit 7, bold red ink on a noisy light background, small",
     f"did you mean {EXAMPLE!r}"),
    ("an italic outlined circle, bold red ink on a noisy light background, small",
     "the figure must be"),
    ("A handwritten digit 7, bold red ink on a noisy light background, small",
     "must start with 'a' or 'an'"),
    ("a handwritten  digit 7, bold red ink on a noisy light background, small",
     "the figure must be"),
])
def test_bad_grammar_names_caption_part_and_grammar(caption: str, part: str) -> None:
    with pytest.raises(InputError) as info:
        parse_caption(caption)
    message = str(info.value)
    assert message.startswith(f"caption {caption!r}: ")
    assert part in message
    assert "expected the procedural grammar 'a [italic] <handwritten|" in message
    assert "\n" not in message


def test_every_ink_contrasts_with_its_tone() -> None:
    assert not set(INKS["light"]) & {"white", "yellow"}
    assert not set(INKS["dark"]) & {"black", "brown"}


# ---------------------------------------------------------------------------- caption source


def test_caption_stream_is_seeded_balanced_and_labelled() -> None:
    cfg = ProceduralCaptionsConfig()
    pairs = list(draw_captions(cfg, 2800, seed=3))
    assert pairs == list(draw_captions(cfg, 2800, seed=3))
    assert [c for c, _ in pairs[:50]] != _captions(50, seed=4)
    counts = collections.Counter(procedural_label(c) for c, _ in pairs)
    assert sorted(counts) == list(range(14))
    assert min(counts.values()) > 0.7 * 2800 / 14  # uniform over classes
    assert all(src == f"procedural:{CLASS_NAMES[procedural_label(c)]}" for c, src in pairs)


def test_caption_stream_options() -> None:
    digits_only = _captions(300, shapes=False, typefaces=["serif"], italic_prob=0.0)
    specs = [parse_caption(c) for c in digits_only]
    assert all(s.is_digit and s.style == "serif" and not s.italic for s in specs)
    assert all(parse_caption(c).italic for c in _captions(100, shapes=False, italic_prob=1.0))


@pytest.mark.parametrize(("section", "message"), [
    ({"num_captions": 5, "procedural": {"typefaces": ["comic"]}},
     "captions.procedural.typefaces[0]: got 'comic', expected one of handwritten, sans-serif"),
    ({"num_captions": 5, "procedural": {"typefaces": []}},
     "captions.procedural.typefaces: expected at least one typeface"),
    ({"num_captions": 5, "procedural": {"italic_prob": 2}},
     "captions.procedural.italic_prob: got 2.0, expected a value <= 1"),
    ({"source": "procedural"}, "captions.num_captions: the procedural source needs a count"),
    ({"num_captions": 5, "procedural": {"colours": 3}}, "captions.procedural.colours: unknown"),
])
def test_procedural_config_errors(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"captions": section})
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["typefaces", "weights", "inks", "textures", "tones", "sizes"])
def test_every_procedural_vocabulary_names_the_bad_word_and_the_allowed_ones(name: str) -> None:
    allowed = getattr(ProceduralCaptionsConfig(), name)  # the default: the whole vocabulary
    section = {"num_captions": 5, "procedural": {name: [allowed[0], "comic"]}}
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"captions": section})
    assert str(info.value) == (f"captions.procedural.{name}[1]: got 'comic', expected one of "
                               f"{', '.join(allowed)}")


def test_captions_stage_with_the_procedural_source(tmp_path: Path) -> None:
    cfg = CaptionsConfig(source="procedural", num_captions=60, num_shards=2, seed=1)
    manifest = make_captions(cfg, str(tmp_path / "captions"))
    assert manifest.count == 60 and manifest.source["kind"] == "procedural"
    rows = [r for i in range(2) for r in load_captions_manifest(manifest.uri).read_shard(i).to_pylist()]
    assert len({r["caption"] for r in rows}) == 60
    for row in rows:
        assert row["source"] == f"procedural:{CLASS_NAMES[procedural_label(row['caption'])]}"


# ---------------------------------------------------------------------------- rendering


def test_fonts_come_from_matplotlib() -> None:
    for face, italic, bold in itertools.product(("sans-serif", "serif", "monospace"),
                                                (False, True), (False, True)):
        assert font_path(face, italic=italic, bold=bold).is_file()


def test_render_is_deterministic_per_caption_and_seed() -> None:
    for caption in _captions(20):
        first = render(caption, 1234, 32, 32)
        assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
        assert np.array_equal(first, render(caption, 1234, 32, 32))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 64), (40, 56)])
def test_render_at_the_asked_size(height: int, width: int) -> None:
    image = render(EXAMPLE, 5, height, width)
    assert image.shape == (height, width, 3)


def test_images_of_one_caption_differ() -> None:
    for caption in _captions(10, seed=2):
        images = [render(caption, seed, 32, 32).astype(np.float32) for seed in range(8)]
        for a, b in itertools.combinations(images, 2):
            assert np.abs(a - b).mean() > 3.0  # grey levels of 255, averaged over pixels


def test_the_caption_fixes_the_content() -> None:
    dark = render("a sans-serif digit 3, bold white ink on a plain dark background, large", 9,
                  32, 32)
    light = render("a sans-serif digit 3, bold black ink on a plain light background, large", 9,
                   32, 32)
    assert np.median(dark) < 100 < 150 < np.median(light)  # the background tone
    red = render("a filled circle, bold red ink on a plain dark background, large", 4, 32, 32)
    ink = red[red[..., 0] > 150]  # (n, 3) the ink pixels
    assert len(ink) > 100 and (ink[:, 0] > ink[:, 1] + 60).all()
    small = render("a filled square, bold white ink on a plain dark background, small", 4, 64, 64)
    large = render("a filled square, bold white ink on a plain dark background, large", 4, 64, 64)
    assert (small.mean(-1) > 128).sum() * 2 < (large.mean(-1) > 128).sum()


def _features(image: np.ndarray, n: int = 8) -> np.ndarray:
    """Ink contrast cropped to its box, squared, pooled to (n * n,), unit length."""
    grey = image.astype(np.float32).mean(-1)
    ink = gaussian_filter(np.abs(grey - np.median(grey)), 1.0)  # (H, W)
    rows, cols = np.nonzero(ink > 0.5 * ink.max())
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    f = np.asarray(Image.fromarray(square).resize((n, n), Image.Resampling.BOX)).ravel()
    f = f - f.mean()
    return f / (np.linalg.norm(f) + 1e-6)


@functools.lru_cache(maxsize=2)
def _centroids(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    captions = _captions(20 * n_per_class, seed=seed, shapes=False)
    labels = np.array([procedural_label(c) for c in captions])
    feats = np.stack([_features(render(c, i, 32, 32)) for i, c in enumerate(captions)])
    half = len(captions) // 2
    centroids = np.stack([feats[:half][labels[:half] == k].mean(0) for k in range(10)])
    return centroids, feats[half:], labels[half:]


def test_digits_are_distinguishable_by_nearest_centroid() -> None:
    # 10 renders per class in, the other half out: chance is 10%.
    centroids, feats, labels = _centroids(20, seed=1)
    accuracy = (np.argmax(feats @ centroids.T, 1) == labels).mean()
    assert accuracy > 0.45, accuracy


def test_render_centroids_classify_real_handwritten_digits() -> None:
    # The same centroids on every other of scikit-learn's 1,797 real 8x8 digits (light ink on
    # dark), upsampled to 32px; chance is 10%.
    from sklearn.datasets import load_digits

    centroids, _, _ = _centroids(20, seed=1)
    digits = load_digits()
    grey = (digits.images[::2] * (255 / 16)).round().astype(np.uint8)  # (899, 8, 8)
    real = np.stack([_features(np.repeat(g.repeat(4, 0).repeat(4, 1)[..., None], 3, -1))
                     for g in grey])
    accuracy = (np.argmax(real @ centroids.T, 1) == digits.target[::2]).mean()
    assert accuracy > 0.25, accuracy


# ---------------------------------------------------------------------------- backend


def _items(captions: list[str], m: int = 2) -> list[WorkItem]:
    return [WorkItem(cid, c, j, 1000 * cid + j) for cid, c in enumerate(captions)
            for j in range(m)]


def test_backend_from_the_registry_draws_at_the_config_size() -> None:
    backend = create_backend(GenerateConfig(backend="procedural", height=32, width=48))
    assert isinstance(backend, ProceduralBackend) and backend.model_id == MODEL_ID
    items = _items(_captions(3))
    pixels = backend.generate(items)
    assert pixels.shape == (6, 32, 48, 3) and pixels.dtype == np.uint8
    # An image does not depend on its batch.
    alone = np.concatenate([backend.generate([it]) for it in reversed(items)])[::-1]
    assert np.array_equal(pixels, alone)
    assert np.array_equal(pixels[0], render(items[0].caption, items[0].seed, 32, 48))


def test_backend_rejects_a_caption_outside_the_grammar() -> None:
    backend = ProceduralBackend(GenerateConfig(backend="procedural", height=32, width=32))
    with pytest.raises(InputError, match=r"^caption 'a photo of a dog': the figure must be"):
        backend.generate(_items([EXAMPLE, "a photo of a dog"]))


def test_generate_config_accepts_the_backend() -> None:
    cfg = from_dict(Config, {"generate": {"backend": "procedural", "height": 32, "width": 32}})
    assert cfg.generate is not None and cfg.generate.backend == "procedural"
    with pytest.raises(ConfigError, match="generate.backend: got 'procedual', expected one of "
                                          "diffusers, tiny, procedural"):
        from_dict(Config, {"generate": {"backend": "procedual"}})


def test_the_procedural_section_counts_only_for_the_procedural_source() -> None:
    from stablerep.captions.stage import output_fingerprint

    other = ProceduralCaptionsConfig(shapes=False)
    synthetic = CaptionsConfig(num_captions=5)
    assert output_fingerprint(synthetic) == output_fingerprint(
        CaptionsConfig(num_captions=5, procedural=other))
    procedural = CaptionsConfig(source="procedural", num_captions=5)
    assert output_fingerprint(procedural) != output_fingerprint(
        CaptionsConfig(source="procedural", num_captions=5, procedural=other))


def test_capacity_is_the_number_of_distinct_captions():
    """Brute force: a long seeded stream reaches exactly the computed capacity, no more."""
    from stablerep.captions.procedural import capacity, draw_captions
    from stablerep.config import ProceduralCaptionsConfig

    cfg = ProceduralCaptionsConfig(shapes=False, typefaces=["serif"], italic_prob=0.0)
    seen = {caption for caption, _ in draw_captions(cfg, 60_000, seed=0)}
    assert len(seen) == capacity(cfg) == 10 * 504
    full = ProceduralCaptionsConfig()
    assert capacity(full) == 10 * 4 * 2 * 504 + 4 * 3 * 504


def test_more_captions_than_the_grammar_has_fail_at_once(tmp_path):
    from stablerep.captions import make_captions
    from stablerep.config import CaptionsConfig

    cfg = CaptionsConfig(source="procedural", num_captions=10**23, work_dir=str(tmp_path / "w"))
    with pytest.raises(InputError, match=r"at most 46,368 distinct ones"):
        make_captions(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- figure-only captions


def test_a_figure_only_caption_round_trips_and_leaves_the_style_open() -> None:
    spec = parse_caption("an italic serif digit 3")
    assert spec == FigureSpec("3", "serif", True) and not spec.styled
    assert format_caption(spec) == "an italic serif digit 3"
    assert parse_caption("a filled circle").label == 10
    with pytest.raises(InputError, match=r"did you mean 'an outlined square'"):
        parse_caption("a outlined square")


def test_style_prob_mixes_figure_only_and_styled_captions() -> None:
    mixed = _captions(2000, style_prob=0.3)
    share = sum(parse_caption(c).styled for c in mixed) / len(mixed)  # named style
    assert 0.25 < share < 0.35
    assert all(not parse_caption(c).styled for c in _captions(200, style_prob=0.0))
    # style_prob 1 draws no extra numbers: the stream of styled captions is what it was
    assert _captions(300, style_prob=1.0) == _captions(300)


def test_capacity_counts_figure_only_captions() -> None:
    from stablerep.captions.procedural import capacity

    figures = 10 * 4 * 2 + 4 * 3
    assert capacity(ProceduralCaptionsConfig(style_prob=0.0)) == figures
    assert capacity(ProceduralCaptionsConfig(style_prob=0.5)) == figures * (504 + 1)
    cfg = ProceduralCaptionsConfig(style_prob=0.0, shapes=False)
    assert len({c for c, _ in draw_captions(cfg, 5000, seed=1)}) == capacity(cfg) == 80


def test_each_image_of_a_figure_only_caption_draws_its_own_style() -> None:
    from stablerep.generation.procedural import draw_style, render_spec

    caption = "a sans-serif digit 5"
    styles = [draw_style(parse_caption(caption), seed) for seed in range(40)]
    assert all(s.styled and s.figure == "5" and s.style == "sans-serif" for s in styles)
    for slot in ("weight", "ink", "texture", "tone", "size"):
        assert len({getattr(s, slot) for s in styles}) > 1, slot
    assert np.array_equal(render(caption, 7, 16, 16), render(caption, 7, 16, 16))
    # an image of the figure-only caption is the styled caption's image for the drawn style
    assert np.array_equal(render(caption, 7, 16, 16),
                          render_spec(draw_style(parse_caption(caption), 7), 7, 16, 16))
    tones = {float(render(caption, s, 16, 16).mean()) > 127 for s in range(20)}
    assert tones == {True, False}  # light and dark backgrounds both occur
