"""Checkpoint files are read as tensors and plain types only (pure CPU, seconds).

A checkpoint whose pickle would call a function (here: one writing a marker file) is refused
with a one-line error for both ways a checkpoint is read, training resume and
``stablerep eval --checkpoint``, and the function never runs; a malformed ``latest.json``
fails with one ``error:`` line and exit status 2. Also: the RNG states survive a
``weights_only`` round trip, and a failed collective is told by its type.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stablerep.cli import main
from stablerep.distributed import CollectiveError, DistEnv, collectives
from stablerep.errors import InputError
from stablerep.training import checkpoint as ckpt


class _Touch:
    """Unpickling this calls ``Path.touch(marker)``: code run by merely loading the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def evil_checkpoint(folder: Path, marker: Path) -> Path:
    """A training folder whose latest.json points at a checkpoint that touches ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ckpt.checkpoint_name(1)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 1,
                "model_info": {"timm_model": "vit_tiny_patch16_224", "image_size": 16},
                "model": {}, "hook": _Touch(marker)}, path)
    (folder / "latest.json").write_text(json.dumps({"step": 1, "checkpoint": path.name}))
    # the file is really harmful: an unrestricted load runs its code
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def test_rng_states_round_trip_under_weights_only() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    buf = io.BytesIO()
    torch.save(ckpt.rng_state(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], want[0])
    assert np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_read_torch_refuses_a_pickled_callable_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "train", marker)
    with pytest.raises(InputError) as info:
        ckpt.read_torch(str(path))
    assert str(info.value).startswith(
        f"{path}: refused to load: it holds objects other than tensors and plain types "
        "(it imports ")
    assert "pathlib.Path" in str(info.value) and "nothing in the file was run" in str(info.value)
    assert not marker.exists()


def test_read_torch_refuses_a_legacy_pickle_with_a_callable(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "old.pt"
    path.write_bytes(pickle.dumps({"hook": _Touch(marker)}, protocol=2))
    with pytest.raises(InputError) as info:
        ckpt.read_torch(str(path))
    assert str(info.value).startswith(f"{path}: refused to load: it holds objects other than "
                                      "tensors and plain types (")
    assert "Unsupported global: GLOBAL getattr was not an allowed global" in str(info.value)
    assert not marker.exists()


def test_read_torch_names_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-00000001.pt"
    path.write_bytes(b"PK\x03\x04" + b"x" * 64)
    with pytest.raises(InputError, match=r"ckpt-00000001\.pt: not a checkpoint \(unreadable: "):
        ckpt.read_torch(str(path))
    path.write_bytes(b"\x00not a pickle" * 50)
    with pytest.raises(InputError, match=r"ckpt-00000001\.pt: not a checkpoint \(unreadable: "
                                         r"neither a torch zip archive nor a pickle\)"):
        ckpt.read_torch(str(path))


def _invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_eval_refuses_a_pickled_callable_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = evil_checkpoint(tmp_path / "train", marker)
    for spec in (str(tmp_path / "train"), str(path)):  # a training folder, or the file
        error = _one_error(_invoke("eval", "--checkpoint", spec, "--out",
                                   str(tmp_path / "eval"), "--datasets", "sklearn:digits"))
        assert error.startswith(f"error: {path}: refused to load: it holds objects other "
                                "than tensors and plain types"), error
        assert not marker.exists()
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(("content", "expected"), [
    (b"[]", "latest.json: got list, expected a JSON object"),
    (b'{"step": 1, "checkpoint": "\xff\xfe.pt"}', "latest.json: not UTF-8 text (byte 0xff at offset 27)"),
    (b'{"step": 1, "checkpoint": "../../etc/passwd"}', "latest.json: got checkpoint='../../etc"),
    (b"{", "latest.json: not valid JSON"),
])
def test_eval_a_malformed_latest_json_is_one_error_line(tmp_path: Path, content: bytes,
                                                        expected: str) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "latest.json").write_bytes(content)
    error = _one_error(_invoke("eval", "--checkpoint", str(tmp_path / "train"), "--out",
                               str(tmp_path / "eval"), "--datasets", "sklearn:digits"))
    assert f"{tmp_path / 'train' / expected}" in error, error
    assert 'expected a JSON object {"step": N, "checkpoint": "ckpt-NNNNNNNN.pt"' in error
    assert not (tmp_path / "eval").exists()


def test_collectives_turns_a_backend_failure_into_its_own_type() -> None:
    two = DistEnv(rank=0, world_size=2)
    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
            "[127.0.0.1]:44165: Connection reset by peer\nmore")
    reset = pytest.raises(CollectiveError, match="RuntimeError: .*Connection reset by peer")
    with reset as info, collectives(two):
        raise RuntimeError(gloo)
    assert isinstance(info.value.__cause__, RuntimeError)
    gone = pytest.raises(CollectiveError, match="DistNetworkError: store gone")
    with gone, collectives(two):
        raise torch.distributed.DistNetworkError("store gone")
    with pytest.raises(torch.OutOfMemoryError), collectives(two):
        raise torch.OutOfMemoryError("out of memory")
    with pytest.raises(RuntimeError) as plain, collectives(DistEnv()):  # one process
        raise RuntimeError(gloo)
    assert type(plain.value) is RuntimeError
    with pytest.raises(InputError), collectives(two):  # user errors are not peer failures
        raise InputError("bad shard")
