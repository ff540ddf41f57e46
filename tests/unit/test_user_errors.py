"""The pieces behind one-line user errors: choices, devices, text/JSON reads, path problems."""

from __future__ import annotations

import errno
import os
import typing

import click
import pytest

from stablerep import local_paths, storage
from stablerep.cli import main
from stablerep.config import (
    CaptionsConfig,
    Config,
    EvalConfig,
    GenerateConfig,
    TrainConfig,
    choices,
    from_dict,
)
from stablerep.devices import check_device
from stablerep.errors import ConfigError, InputError

# (command, option) -> the config field the option sets
OPTION_FIELDS = {
    ("captions", "source"): (CaptionsConfig, "source"),
    ("generate", "backend"): (GenerateConfig, "backend"),
    ("generate", "scheduler"): (GenerateConfig, "scheduler"),
    ("generate", "image_format"): (GenerateConfig, "image_format"),
    ("generate", "dtype"): (GenerateConfig, "dtype"),
    ("train", "method"): (TrainConfig, "method"),
}


def test_every_cli_choice_is_its_config_literal():
    seen = set()
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.type, click.Choice):
                key = (name, param.name)
                assert key in OPTION_FIELDS, f"{key}: a choice with no config field"
                cls, field = OPTION_FIELDS[key]
                assert tuple(param.type.choices) == choices(cls, field)
                seen.add(key)
    assert seen == set(OPTION_FIELDS)


@pytest.mark.parametrize(("cls", "field"), [
    (CaptionsConfig, "compression"), (GenerateConfig, "scheduler"),
    (GenerateConfig, "image_format"), (GenerateConfig, "dtype"), (TrainConfig, "method"),
    (TrainConfig, "augmentation"), (TrainConfig, "precision"), (EvalConfig, "precision"),
])
def test_choice_fields_are_literals_and_keep_their_messages(cls, field):
    assert typing.get_origin(typing.get_type_hints(cls)[field]) is typing.Literal
    allowed = choices(cls, field)
    section = {CaptionsConfig: "captions", GenerateConfig: "generate", TrainConfig: "train",
               EvalConfig: "eval"}[cls]
    data = {section: {field: "nonsense"}}
    if cls is CaptionsConfig:
        data[section]["num_captions"] = 5
    with pytest.raises(ConfigError) as err:
        from_dict(Config, data)
    assert str(err.value) == (f"{section}.{field}: got 'nonsense', expected one of "
                              f"{', '.join(allowed)}")


def test_choices_refuses_a_free_text_field():
    with pytest.raises(TypeError, match="TrainConfig.model is not a Literal"):
        choices(TrainConfig, "model")


@pytest.mark.parametrize(("name", "indexed", "ok"), [
    ("auto", True, True), ("cpu", False, True), ("cuda", False, True), ("cuda:3", True, True),
    ("cuda:3", False, False), ("cuda:", True, False), ("bogus", True, False),
    ("CPU", True, False), (0, True, False),
])
def test_one_device_validator(name, indexed, ok):
    if ok:
        check_device(name, field="x.device", indexed=indexed)
        return
    with pytest.raises(ConfigError, match=r"^x\.device: got .*, expected auto, cpu"):
        check_device(name, field="x.device", indexed=indexed)


def test_every_stage_validates_its_device():
    for section in ("generate", "train", "eval"):
        with pytest.raises(ConfigError, match=rf"^{section}\.device: got 'bogus'"):
            from_dict(Config, {section: {"device": "bogus"}})


def test_non_str_yaml_keys_are_named_not_crashed():
    with pytest.raises(ConfigError, match="^1: unknown field"):
        from_dict(Config, {1: 2, "data_root": "x"})


def test_read_text_and_json_name_the_uri(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(InputError, match=r"latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 3"):
        storage.read_text(str(tmp_path / "latin1.txt"))
    with pytest.raises(InputError, match=r"latin1\.txt: not UTF-8"):
        storage.read_json(str(tmp_path / "latin1.txt"))
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert storage.read_json(str(tmp_path / "bom.json"), expect=dict) == {"a": 1}
    (tmp_path / "list.json").write_text("[]")
    assert storage.read_json(str(tmp_path / "list.json")) == []
    with pytest.raises(InputError, match=r"list\.json: expected a JSON file holding an object, "
                                         "got an array"):
        storage.read_json(str(tmp_path / "list.json"), expect=dict)
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match=r"deep\.json: not valid JSON"):
        storage.read_json(str(tmp_path / "deep.json"))
    with pytest.raises(storage.StorageError):  # the existing handlers still catch it
        storage.read_json(str(tmp_path / "deep.json"))


def test_writes_through_a_regular_file_name_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = {"afile/x.json": "cannot write afile/x.json: afile is a regular file, expected a "
                             "folder",
             "afile/a/b.json": "cannot write afile/a/b.json: afile is a regular file",
             "adir": "cannot write adir: it is a folder, expected a file"}
    for uri, message in cases.items():
        with pytest.raises(storage.StorageError) as err:
            storage.write_json(uri, {"a": 1})
        assert str(err.value).startswith(message), err.value
    with pytest.raises(storage.StorageError, match="cannot read adir: adir is a folder"):
        storage.read_bytes("adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert list((tmp_path / "adir").iterdir()) == []  # no staged file left behind


def test_describe_path_error_only_describes_path_problems(tmp_path):
    (tmp_path / "f").write_text("x")
    err = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "f" / "g"))
    assert local_paths.describe_path_error(err) == f"{tmp_path / 'f'} is a regular file, expected " \
                                               "a folder"
    denied = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert local_paths.describe_path_error(denied) == (  # who the process is, who owns the folder
        f"/root/x: permission denied to UID {os.getuid()}; /root is owned by UID "
        f"{os.stat('/root').st_uid}, mode {os.stat('/root').st_mode & 0o7777:o}")
    assert local_paths.describe_path_error(OSError(errno.EIO, "I/O error", "/x")) is None
    assert local_paths.describe_path_error(RuntimeError("no")) is None
    assert local_paths.describe_path_error(FileExistsError(errno.EEXIST, "exists")) is None


def test_check_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    storage.check_output_folder("new/folder", field="x.out")  # creatable: fine
    storage.check_output_folder("gs://bucket/afile", field="x.out")  # remote: never a file
    with pytest.raises(storage.StorageError, match="^x.out: afile is a regular file"):
        storage.check_output_folder("afile", field="x.out")
    with pytest.raises(storage.StorageError, match="^x.out: afile/b runs through afile"):
        storage.check_output_folder("afile/b", field="x.out")
    assert not (tmp_path / "new").exists()
