"""Config: YAML recipes, dotted overrides, validation messages that name the field, dumps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stablerep.config import (
    CaptionsConfig,
    Config,
    apply_overrides,
    dump_yaml,
    fingerprint,
    from_dict,
    load_config,
    parse_override,
)
from stablerep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_recipe_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_root: gs://b/p\ncaptions:\n  num_captions: 10\n  num_shards: 2\n")
    cfg = load_config(str(recipe), ["captions.num_shards=5", "captions.seed=7",
                                    "captions.inputs=[a.tsv, b.tsv]"])
    assert cfg.data_root == "gs://b/p"
    assert cfg.captions.num_captions == 10
    assert cfg.captions.num_shards == 5
    assert cfg.captions.seed == 7
    assert cfg.captions.inputs == ["a.tsv", "b.tsv"]
    assert cfg.captions.min_chars == CaptionsConfig.min_chars  # untouched default


def test_nested_dataclass_lists_from_yaml():
    cfg = from_dict(Config, {"captions": {"num_captions": 5, "synthetic": {"concepts": [
        {"name": "a", "uri": "builtin:imagenet1k", "weight": 2},
        {"name": "b", "uri": "gs://x/y.txt", "weight": 0.5}]}}})
    concepts = cfg.captions.synthetic.concepts
    assert [c.name for c in concepts] == ["a", "b"]
    assert concepts[0].weight == 2.0 and isinstance(concepts[0].weight, float)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"captions": {"num_captions": 5, "num_shards": 0}}, "captions.num_shards: got 0"),
        ({"captions": {"num_captions": 5, "num_shards": -3}}, "captions.num_shards: got -3"),
        ({"captions": {"num_captions": 0}}, "captions.num_captions: got 0"),
        ({"captions": {"num_captions": "many"}}, "captions.num_captions: got 'many', expected an integer"),
        ({"captions": {"num_captions": 5, "source": "web"}}, "captions.source: got 'web', expected one of synthetic, files"),
        ({"captions": {"num_captions": 5, "format": "xml"}}, "captions.format: got 'xml'"),
        ({"captions": {"source": "files"}}, "captions.inputs"),
        ({"captions": {}}, "captions.num_captions: the synthetic source needs a count"),
        ({"captions": {"num_captions": 5, "bogus": 1}}, "captions.bogus: unknown field; known fields:"),
        ({"captions": {"num_captions": 5, "synthetic": {"rewriter": "none"}}}, "captions.synthetic.rewriter: unknown field; known fields: background_prob, backgrounds_uri, concepts, num_rows, oversample, templates_uri"),
        ({"captions": {"num_captions": 5, "procedural": {"inks": ["white", "pink"]}}}, "captions.procedural.inks[1]: got 'pink', expected one of black, grey, red, green, blue, purple, brown, white, yellow, orange"),
        ({"captions": {"num_captions": 5, "procedural": {"tones": ["dim"]}}}, "captions.procedural.tones[0]: got 'dim', expected one of light, dark"),
        ({"nonsense": 1}, "nonsense: unknown field"),
        ({"captions": {"num_captions": 5, "allow_fewer": "yes"}}, "captions.allow_fewer: got 'yes', expected true or false"),
        ({"captions": {"num_captions": 5, "synthetic": {"background_prob": 1.5}}}, "captions.synthetic.background_prob: got 1.5"),
        ({"captions": {"num_captions": 5, "synthetic": {"concepts": []}}}, "captions.synthetic.concepts"),
        ({"captions": {"num_captions": 5, "synthetic": {"concepts": [{"name": "x", "weight": 0}]}}}, "weight: got 0.0, expected a value > 0"),
    ],
)
def test_validation_names_field_and_expectation(data, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(Config, data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("captions.num_shards")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("captions..x=1")
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"captions": 3}, ["captions.seed=1"])


def test_float_fields_accept_exponents_without_a_dot():
    cfg = load_config(None, ["captions.num_captions=5", "captions.synthetic.background_prob=5e-1"])
    assert cfg.captions.synthetic.background_prob == 0.5
    with pytest.raises(ConfigError, match="background_prob: got 'lots', expected a number"):
        load_config(None, ["captions.num_captions=5", "captions.synthetic.background_prob=lots"])


def test_override_values_are_yaml():
    data = apply_overrides({}, ["a.b=3", "a.c=true", "a.d=null", "a.e=[1, 2]", "a.f=text"])
    assert data == {"a": {"b": 3, "c": True, "d": None, "e": [1, 2], "f": "text"}}


def test_dump_round_trips_and_fingerprint_is_stable():
    cfg = from_dict(Config, {"captions": {"num_captions": 9, "inputs": []}})
    again = from_dict(Config, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert fingerprint(again) == fingerprint(cfg)
    changed = from_dict(Config, {"captions": {"num_captions": 10}})
    assert fingerprint(changed) != fingerprint(cfg)


def test_bad_yaml_recipe_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("captions: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(listy))


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_recipes_load(recipe):
    cfg = load_config(str(ROOT / "configs" / recipe))
    assert cfg.captions is not None


# ---------------------------------------------------------------------------- built-in recipes


def test_builtin_recipe_names_resolve_to_the_packaged_recipes() -> None:
    from stablerep.config import RECIPES_DIR, builtin_recipes

    assert RECIPES_DIR == ROOT / "stablerep" / "recipes"
    assert {"demo", "demo_sd", "repro", "cc12m", "procedural"} <= set(builtin_recipes())
    by_name = load_config("cc12m", require=("train",))
    by_path = load_config(str(ROOT / "configs" / "cc12m.yaml"), require=("train",))
    assert by_name == by_path and by_name.captions.source == "files"
    assert load_config("demo_sd").generate.backend == "tiny"
    assert load_config("demo").generate.backend == "procedural"


def test_configs_folder_is_the_packaged_recipes() -> None:
    link = ROOT / "configs"
    assert link.is_symlink() and link.resolve() == ROOT / "stablerep" / "recipes"
    assert (link / "k8s" / "cc12m_4x8.yaml").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"recipes/*.yaml"' in pyproject and '"recipes/k8s/*.yaml"' in pyproject


def test_unknown_recipe_name_lists_the_builtin_ones() -> None:
    from stablerep.config import builtin_recipes

    with pytest.raises(ConfigError) as e:
        load_config("cc13m")
    message = str(e.value)
    assert message.startswith("recipe 'cc13m': not a built-in recipe; expected one of ")
    assert ", ".join(builtin_recipes()) in message and "\n" not in message


def test_a_path_is_not_taken_for_a_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("data_root: here\n")
    assert load_config("mine.yaml").data_root == "here"
    assert load_config("./mine.yaml").data_root == "here"


def test_flags_and_data_root_win_over_overrides_and_recipe(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_root: a\ncaptions:\n  num_captions: 10\n  seed: 1\n")
    cfg = load_config(str(recipe), ["captions.seed=2", "captions.num_shards=3"],
                      require=("captions",),
                      flags={"captions": {"seed": 3, "num_shards": None, "inputs": ()}},
                      data_root="b")
    assert (cfg.data_root, cfg.captions.seed, cfg.captions.num_shards) == ("b", 3, 3)
    assert cfg.captions.inputs == []
    tuples = load_config(None, require=("captions",),
                         flags={"captions": {"num_captions": 5, "inputs": ("x.tsv",),
                                             "source": "files"}})
    assert tuples.captions.inputs == ["x.tsv"]


def test_a_required_section_set_to_a_scalar_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^captions: got 3, expected a mapping of captions"):
        load_config(None, ["captions=3"], require=("captions",))


@pytest.mark.parametrize(("override", "message"), [
    ("train.cache_mb=.nan", "train.cache_mb: got nan, expected a finite number"),
    ("captions.procedural.oversample=.inf", "captions.procedural.oversample: got inf, "
                                            "expected a finite number"),
    ("train.base_lr=-.inf", "train.base_lr: got -inf, expected a finite number"),
])
def test_a_float_that_is_not_finite_is_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config("demo", [override])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.model_kwargs.depth=-3"], "train.model_kwargs.depth: got -3, expected a positive "
                                      "integer"),
    (["train.model_kwargs.patch_size=0"], "train.model_kwargs.patch_size: got 0, expected a "
                                          "positive integer"),
    (["train.model_kwargs.num_heads=2.5"], "train.model_kwargs.num_heads: got 2.5, expected a "
                                           "positive integer"),
    (["train.model_kwargs.patch_size=8", "train.image_size=12"],
     r"train.image_size: got 12, expected a multiple of the patch size 8 \(and >= it\)"),
    (["train.model_kwargs={}", "train.model=vit_tiny_patch16_224", "train.image_size=8"],
     r"train.image_size: got 8, expected a multiple of the patch size 16 \(and >= it\)"),
    (["train.model_kwargs={embed_dim: 30, num_heads: 4}"],
     "train.model_kwargs.num_heads: got 4, expected a divisor of train.model_kwargs.embed_dim "
     "30"),
])
def test_model_kwargs_that_cannot_build_a_vit_are_refused(overrides: list[str],
                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config("demo", overrides)
