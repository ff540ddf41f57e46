"""The tiny offline Stable Diffusion pipeline: tokenizer, save/load round trip, generation.

The pipeline is built and saved once per module; tests load it back the way a real SD v1.5
checkpoint is loaded (``StableDiffusionPipeline.from_pretrained``) and draw small images on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean
from safetensors.torch import load_file

from stablerep.errors import ConfigError, InputError
from stablerep.generation import tiny

CAPTIONS = [
    "A photo of a cat.",
    "Hello, world!!! (really?) -- yes; 100% #1 @home",
    "It's what they'll do; we've, I'm sure you'd agree",
    "café naïve résumé über",
    "東京の夜景 🌃 with emoji ☕ and a snowman ☃",
    "  multiple   spaces\tand\nnewlines  ",
    "UPPER lower MiXeD 2024 3.14",
]
# open_clip cleans text with ftfy (NFKC) and html.unescape; HF's fast CLIPTokenizer does not.
NEEDS_CLEANING = ["fish &amp; chips", "ﬁne ligature", "Ｆｕｌｌｗｉｄｔｈ letters"]
LONG_CAPTION = " ".join(f"word{i}, and" for i in range(60))  # far more than 77 tokens

SD15_CLASSES = {
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "unet": ("diffusers", "UNet2DConditionModel"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)


def _load(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folder: Path) -> StableDiffusionPipeline:
    return _load(folder)


def _draw(pipe: StableDiffusionPipeline, n: int = 8, size: int = 64) -> list:
    generators = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(n)]
    captions = [f"a photo of thing number {i}" for i in range(n)]
    return pipe(
        captions,
        height=size,
        width=size,
        num_inference_steps=5,
        guidance_scale=2.0,
        generator=generators,
    ).images


def _open_clip_ids(text: str) -> list[int]:
    """open_clip's ids up to and including <end_of_text> (open_clip pads with 0 after it)."""
    ids = open_clip.tokenize([text])[0].tolist()
    return ids[: ids.index(49407) + 1]


def _pipeline_ids(pipe: StableDiffusionPipeline, text: str) -> list[int]:
    """Token ids the way StableDiffusionPipeline.encode_prompt tokenises a prompt."""
    tok = pipe.tokenizer
    return tok(
        text, padding="max_length", max_length=tok.model_max_length, truncation=True
    ).input_ids


def test_vocabulary_equals_open_clips() -> None:
    vocab, merges = tiny.clip_vocab_and_merges()
    reference = SimpleTokenizer()
    renamed = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    assert len(vocab) == len(reference.encoder) == 49408
    assert {renamed.get(k, k): v for k, v in vocab.items()} == reference.encoder
    assert dict(zip(merges, range(len(merges)), strict=True)) == reference.bpe_ranks


def test_tokenizer_files_have_hf_format(tmp_path: Path) -> None:
    vocab_path, merges_path = tiny.tokenizer_files(tmp_path / "tok")
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "vocab.json"]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_token_ids_equal_open_clips(pipe: StableDiffusionPipeline, caption: str) -> None:
    expected = _open_clip_ids(caption)
    ids = _pipeline_ids(pipe, caption)
    assert len(ids) == 77
    assert ids[: len(expected)] == expected
    assert set(ids[len(expected) :]) <= {49407}  # padded with <|endoftext|>


@pytest.mark.parametrize("caption", NEEDS_CLEANING)
def test_token_ids_equal_open_clips_after_its_cleaning(
    pipe: StableDiffusionPipeline, caption: str
) -> None:
    cleaned = whitespace_clean(basic_clean(caption))
    expected = _open_clip_ids(caption)
    assert _pipeline_ids(pipe, cleaned)[: len(expected)] == expected


def test_long_caption_is_truncated_like_open_clip(pipe: StableDiffusionPipeline) -> None:
    assert len(SimpleTokenizer().encode(LONG_CAPTION)) > 77
    ids = _pipeline_ids(pipe, LONG_CAPTION)
    assert ids == open_clip.tokenize([LONG_CAPTION])[0].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407
    embeds, negative = pipe.encode_prompt(LONG_CAPTION, "cpu", 1, True, "")
    assert embeds.shape == negative.shape == (1, 77, 32)


def test_round_trip_has_sd15_classes(folder: Path, pipe: StableDiffusionPipeline) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name, (library, cls) in SD15_CLASSES.items():
        assert tuple(index[name]) == (library, cls)
        assert type(getattr(pipe, name)).__name__ == cls
    assert tuple(index["scheduler"]) == ("diffusers", "DDIMScheduler")
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert index["requires_safety_checker"] is False

    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000 and cfg.steps_offset == 1
    assert cfg.clip_sample is False and cfg.set_alpha_to_one is False

    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.unet.config.sample_size == 8
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    te = pipe.text_encoder.config
    assert (te.vocab_size, te.max_position_embeddings) == (49408, 77)
    tok = pipe.tokenizer
    assert (tok.model_max_length, len(tok)) == (77, 49408)
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    for extra in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / extra).is_file()


def test_saved_weights_are_seeded_and_leave_global_rng_alone(folder: Path) -> None:
    state = torch.get_rng_state()
    rebuilt = tiny.build_tiny_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    fresh = rebuilt.unet.state_dict()
    assert saved.keys() == fresh.keys()
    assert all(torch.equal(saved[k], fresh[k]) for k in saved)
    other = tiny.build_tiny_pipeline(seed=1).unet.state_dict()
    assert not all(torch.equal(fresh[k], other[k]) for k in fresh)


def test_generation_on_cpu_gives_requested_size_and_is_deterministic(
    folder: Path, pipe: StableDiffusionPipeline
) -> None:
    first = _draw(pipe)
    assert len(first) == 8
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in first)
    again = _draw(_load(folder))  # a second, independent load with the same seeds
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)
    )
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    small = _draw(pipe, n=1, size=32)
    assert small[0].size == (32, 32)


def test_default_size_is_image_size(pipe: StableDiffusionPipeline) -> None:
    image = pipe("a dog", num_inference_steps=2, guidance_scale=2.0).images[0]
    assert image.size == (64, 64)


def test_second_save_does_not_rebuild(folder: Path) -> None:
    before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder, *folder.rglob("*"))]
    assert tiny.save_tiny_pipeline(folder, seed=0) == folder
    after = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in (folder, *folder.rglob("*"))]
    assert before == after
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging leftovers


class _FakePipeline:
    """Stands in for the built pipeline so save_tiny_pipeline's publishing can be tested fast."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_pretrained(self, path: Path, **_: object) -> None:
        path = Path(path)
        (path / "unet").mkdir(parents=True)
        (path / "unet" / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("killed halfway")
        (path / "model_index.json").write_text("{}")


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda **_: _FakePipeline(fail=True))
    with pytest.raises(RuntimeError, match="killed halfway"):
        tiny.save_tiny_pipeline(tmp_path / "sd")
    assert list(tmp_path.iterdir()) == []


def test_save_fills_an_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda **_: _FakePipeline(fail=False))
    (tmp_path / "sd").mkdir()
    out = tiny.save_tiny_pipeline(tmp_path / "sd")
    assert (out / "model_index.json").is_file()
    assert (out / "tokenizer" / "vocab.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["sd"]


def test_save_refuses_a_folder_with_other_content(tmp_path: Path) -> None:
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="model_index.json"):
        tiny.save_tiny_pipeline(tmp_path / "sd")
    assert (tmp_path / "sd" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad", [0, 60, 8, 64.0, True])
def test_bad_image_size_is_a_config_error(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        tiny.save_tiny_pipeline(tmp_path / "sd", image_size=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "sd").exists()
