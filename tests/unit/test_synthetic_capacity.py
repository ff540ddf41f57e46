"""The synthetic source's capacity and the stage's exits (pure CPU, seconds).

- :meth:`SyntheticSource.capacity` equals a brute-force count of the distinct normalised
  captions over every (concept, template, background or none) combination, for lists with
  case duplicates, concepts shared by two lists, templates that collide once an article is
  added, and commas that let two combinations spell the same caption; a long seeded draw
  from small lists reaches exactly that many distinct captions;
- asking for more than the capacity fails at once, before the work folder is made;
- :func:`sigterm_exits` turns a real SIGTERM into ``SystemExit(143)`` and puts the previous
  handler back.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stablerep.captions import make_captions
from stablerep.captions import synthetic as synthetic_module
from stablerep.captions.clean import normalise
from stablerep.captions.stage import sigterm_exits
from stablerep.captions.synthetic import SyntheticSource, check_capacity, synthetic_rows
from stablerep.config import CaptionsConfig, ConceptSource, SyntheticCaptionsConfig
from stablerep.errors import InputError


def _lists(tmp_path: Path, *, concepts: dict[str, list[str]], templates: list[str],
           backgrounds: list[str], background_prob: float = 0.5) -> SyntheticCaptionsConfig:
    sources = []
    for name, items in concepts.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(items) + "\n")
        sources.append(ConceptSource(name, str(tmp_path / f"{name}.txt")))
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    (tmp_path / "backgrounds.txt").write_text("\n".join(backgrounds) + "\n")
    return SyntheticCaptionsConfig(concepts=sources, templates_uri=str(tmp_path / "templates.txt"),
                                   backgrounds_uri=str(tmp_path / "backgrounds.txt"),
                                   background_prob=background_prob)


def _brute_force(source: SyntheticSource) -> int:
    """Distinct normalised captions over every combination the draw can make."""
    options: list[str | None] = []
    if source.background_prob < 1:
        options.append(None)
    if source.background_prob > 0:
        options += source.backgrounds
    return len({normalise(source._caption(c, t, b)) for group in source.concepts
                for c in group for t in source.templates for b in options})


CASES = {
    "plain": dict(concepts={"a": ["dog", "cat", "owl"]},
                  templates=["a photo of {a_concept}", "a sketch of {concept}"],
                  backgrounds=["on a beach", "at night"]),
    # "Dog" = "dog" once case-folded; "fox" is in both lists; "a {concept}" = "{a_concept}"
    # for consonants but not for "owl" (an owl / a owl); the templates differ only in case.
    "collisions": dict(concepts={"a": ["dog", "Dog", "owl", "fox"], "b": ["fox", "bee"]},
                       templates=["{a_concept}", "a {concept}", "A photo of {concept}",
                                  "a photo of {concept}"],
                       backgrounds=["in snow", "In  Snow", "at dusk"]),
    # "{concept}, in a field" without a background = "{concept}" with "in a field"; and
    # "x, y" + "z" = "x" + "y, z".
    "commas": dict(concepts={"a": ["dog", "cat"]},
                   templates=["{concept}", "{concept}, in a field", "{concept}, seen"],
                   backgrounds=["in a field", "at noon", "seen, at noon", "in a field, at noon"]),
    "always background": dict(concepts={"a": ["dog", "cat"]}, templates=["{concept}, big"],
                              backgrounds=["big", "tiny", "big, tiny"], background_prob=1.0),
    "never background": dict(concepts={"a": ["dog", "cat", "Cat"]},
                             templates=["{concept}", "{a_concept}"],
                             backgrounds=["on grass"], background_prob=0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_capacity_counts_distinct_captions_exactly(case: str, tmp_path: Path) -> None:
    source = SyntheticSource.from_config(_lists(tmp_path, **CASES[case]))
    assert source.capacity() == _brute_force(source)


def test_capacity_counts_collisions_not_the_plain_product(tmp_path: Path) -> None:
    collisions = SyntheticSource.from_config(_lists(tmp_path, **CASES["collisions"]))
    # dog (= Dog), fox and bee take 2 texts each, owl 3; 2 distinct backgrounds + none
    assert collisions.capacity() == (3 * 2 + 3) * 3
    (tmp_path / "commas").mkdir()
    commas = SyntheticSource.from_config(_lists(tmp_path / "commas", **CASES["commas"]))
    assert commas.capacity() < 2 * 3 * (4 + 1)


def test_capacity_above_the_count_limit_is_an_upper_bound(tmp_path: Path,
                                                          monkeypatch) -> None:
    source = SyntheticSource.from_config(_lists(tmp_path, **CASES["commas"]))
    exact = source.capacity()
    monkeypatch.setattr(synthetic_module, "COUNT_LIMIT", 0)
    assert source.capacity() == 2 * 3 * (4 + 1) > exact


def test_builtin_capacity_is_the_product_of_the_lists() -> None:
    source = SyntheticSource.from_config(SyntheticCaptionsConfig())
    concepts = len({normalise(c) for c in source.concepts[0]})
    # no built-in text holds ", ", so the product is exact (and the check is instant)
    assert source.capacity() == concepts * len(source.templates) * (len(source.backgrounds) + 1)


def test_a_long_draw_reaches_the_capacity(tmp_path: Path) -> None:
    cfg = _lists(tmp_path, **CASES["collisions"])
    capacity = SyntheticSource.from_config(cfg).capacity()
    rows, _ = synthetic_rows(cfg, 20_000, seed=0)
    assert len({normalise(c) for c, _ in rows}) == capacity


def test_more_than_the_capacity_fails_before_any_work(tmp_path: Path) -> None:
    cfg = _lists(tmp_path, **CASES["plain"])
    capacity = check_capacity(cfg, 18)
    assert capacity == 3 * 2 * 3
    with pytest.raises(InputError) as err:
        check_capacity(cfg, 19)
    assert str(err.value) == (
        "captions.num_captions: asked for 19 captions, but the synthetic source can make at "
        "most 18 distinct ones (3 concepts x 2 templates x (2 backgrounds + none)); lower it, "
        "or raise the capacity with more concepts (captions.synthetic.concepts), templates "
        "(captions.synthetic.templates_uri) or backgrounds (captions.synthetic.backgrounds_uri)")
    work = tmp_path / "work"
    stage_cfg = CaptionsConfig(num_captions=10**23, synthetic=cfg, work_dir=str(work))
    with pytest.raises(InputError, match=r"asked for 100,000,000,000,000,000,000,000 captions"):
        make_captions(stage_cfg, str(tmp_path / "out"))
    assert not work.exists() and not (tmp_path / "out").exists()


def test_sigterm_exits_raises_system_exit_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as err, sigterm_exits():
        assert signal.getsignal(signal.SIGTERM) is not before
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        finally:
            cleaned.append(True)
    assert err.value.code == 143 and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before
