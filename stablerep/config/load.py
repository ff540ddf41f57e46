"""Building a :class:`Config`: recipes, dotted overrides, validation, the dump.

A recipe is a YAML mapping whose top-level keys are the fields of :class:`Config`; command
lines override any field with ``--set captions.num_captions=1000`` (the value is read as YAML).
:func:`from_dict` checks names and types with pydantic (strict, over the section dataclasses
themselves) and turns its errors into one-line :class:`ConfigError` messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from stablerep.config.sections import Config
from stablerep.errors import ConfigError

C = TypeVar("C")

# Validation is pydantic's (strict, over the dataclasses themselves); this part only turns its
# errors into the one-line ``<dotted.field>: got X, expected Y`` of a ConfigError.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_EXPECTED = {  # pydantic error type -> what the field expected
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "dataclass_type": "a mapping", "missing": "a value",
}


def _declare_strict(tp: Any) -> None:
    """Give ``tp`` and every dataclass inside it pydantic's strict config (once)."""
    if dataclasses.is_dataclass(tp):
        if "__pydantic_config__" in vars(tp):
            return
        tp.__pydantic_config__ = _STRICT  # type: ignore[union-attr]
        for hint in typing.get_type_hints(tp).values():
            _declare_strict(hint)
    for arg in typing.get_args(tp):
        _declare_strict(arg)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    _declare_strict(cls)
    return TypeAdapter(cls)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation as it is."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _annotation_at(tp: Any, loc: tuple[Any, ...]) -> Any:
    """The annotation that ``loc`` (a pydantic error location) reaches from ``tp``."""
    tp = _unwrap(tp)
    for part in loc:
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(str(part), Any)
        elif typing.get_args(tp):
            tp = typing.get_args(tp)[-1]  # list[X] -> X, dict[str, X] -> X
        tp = _unwrap(tp)
    return tp


def _dotted(where: str, loc: tuple[Any, ...]) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _translate(cls: type, where: str, error: Any) -> ConfigError:
    """One pydantic error (a dict of ``ValidationError.errors()``) as a ConfigError."""
    loc, kind, value = tuple(error["loc"]), error["type"], error["input"]
    if kind == "value_error" and isinstance(error["ctx"]["error"], ConfigError):
        return error["ctx"]["error"]  # raised by a section's __post_init__, already worded
    name = _dotted(where, loc) or "config"
    if kind == "unexpected_keyword_argument":
        known = sorted(f.name for f in dataclasses.fields(_annotation_at(cls, loc[:-1])))
        return ConfigError(f"{name}: unknown field; known fields: {', '.join(known)}")
    if kind == "literal_error":
        allowed = typing.get_args(_annotation_at(cls, loc))
        return ConfigError(f"{name}: got {value!r}, expected one of "
                           f"{', '.join(map(str, allowed))}")
    expected = _EXPECTED.get(kind)
    if expected is None:
        return ConfigError(f"{name}: got {value!r}, {error['msg']}")
    return ConfigError(f"{name}: got {value!r}, expected {expected}")


def _loosen(data: Any, error: Any) -> bool:
    """Apply the two conversions strict mode lacks; True if ``error`` was fixed in ``data``.

    A number where text is expected becomes that text; a string where a number is expected is
    read as one (YAML 1.1 reads ``2e-3``, without a dot, as a string).
    """
    loc, kind, value = error["loc"], error["type"], error["input"]
    if kind == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        fixed: Any = str(value)
    elif kind == "float_type" and isinstance(value, str):
        try:
            fixed = float(value)
        except ValueError:
            return False
    else:
        return False
    node = data
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = fixed
    return True


def from_dict(cls: type[C], data: Any, where: str = "") -> C:
    """Build the dataclass ``cls`` from a mapping, checking names and types (with pydantic).

    Args:
        cls: a config dataclass.
        data: a mapping of field names to values (``None`` = all defaults).
        where: the dotted path of ``data`` in the recipe, for error messages.

    Raises:
        ConfigError: naming the first wrong field: ``<dotted.field>: got X, expected Y``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: got {data!r}, expected a mapping")
    # a plain JSON tree: strict pydantic takes a JSON object for a dataclass, a dict it does not
    plain = json.loads(json.dumps(to_dict(data), default=str))
    while True:
        try:
            return _adapter(cls).validate_json(json.dumps(plain))
        except ValidationError as e:
            errors = e.errors()
            if not any([_loosen(plain, err) for err in errors]):
                raise _translate(cls, where, errors[0]) from None


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-serialisable) copy of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating missing sections."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {what}: {part} is not a section")
        node = child
    node[path[-1]] = value


def apply_values(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted fields to typed values (``{"generate.images_per_caption": 10}``), in place.

    The values are checked with the rest of the config by :func:`from_dict`.
    """
    for key, value in values.items():
        _set_path(data, key.split("."), value, key)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested mapping (in place; also returned)."""
    for text in overrides:
        path, value = parse_override(text)
        _set_path(data, path, value, text)
    return data


def load_yaml(uri: str) -> dict[str, Any]:
    """Read a YAML recipe (any storage URI) into a mapping."""
    from stablerep import storage

    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as e:
        raise ConfigError(f"{uri}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a YAML mapping at the top level")
    return data


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""The built-in recipes, shipped as package data (``configs/`` in a checkout links here)."""


def builtin_recipes() -> list[str]:
    """The names of the built-in recipes (``demo``, ``cc12m`` ...), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def is_recipe_name(recipe: str) -> bool:
    """True for a bare recipe name (``cc12m``), False for a path or URI (``a/b.yaml``)."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", recipe) is not None


def resolve_recipe(recipe: str) -> str:
    """The URI of ``recipe``: a built-in recipe name, or a path / URI returned as given.

    Raises:
        ConfigError: for a bare name that is not a built-in recipe, listing the built-ins.
    """
    if not is_recipe_name(recipe):
        return recipe
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {recipe!r}: not a built-in recipe; expected one of "
                          f"{', '.join(builtin_recipes())}, or a path or URI of a YAML recipe")
    return str(path)


def _ensure_section(data: dict[str, Any], section: str) -> dict[str, Any]:
    if data.get(section) is None:
        data[section] = {}
    if not isinstance(data[section], dict):
        raise ConfigError(f"{section}: got {data[section]!r}, expected a mapping of {section} "
                          "fields")
    return data[section]


def load_config(
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] | None = None,
    *,
    require: tuple[str, ...] = (),
    flags: dict[str, dict[str, Any]] | None = None,
    data_root: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Load a recipe, apply overrides and build a validated :class:`Config`.

    Precedence, lowest first: field defaults < the recipe < ``values`` < ``overrides`` <
    ``flags`` < ``data_root``.

    Args:
        recipe: a built-in recipe name (``demo``, ``cc12m``; see :func:`builtin_recipes`), a
            YAML recipe path or URI, or ``None`` for defaults only.
        overrides: ``key.path=value`` strings, applied in order after the recipe.
        require: sections to create with defaults when the recipe lacks them.
        flags: per section, field values applied last (a command line's own flags); values
            that are ``None`` or ``()`` are left out, tuples become lists.
        data_root: replaces ``data_root`` when given.
        values: dotted field -> typed value (``{"generate.images_per_caption": 10}``), applied
            after the recipe and before ``overrides``; checked like the rest.

    Raises:
        ConfigError: naming the recipe, the override or the field that is wrong.
    """
    data = load_yaml(resolve_recipe(recipe)) if recipe else {}
    for section in require:
        data.setdefault(section, {})
    apply_values(data, values or {})
    apply_overrides(data, list(overrides or []))
    for section in require:
        _ensure_section(data, section)
    for section, values in (flags or {}).items():
        target = _ensure_section(data, section)
        for key, value in values.items():
            if value is not None and value != ():
                target[key] = list(value) if isinstance(value, tuple) else value
    if data_root is not None:
        data["data_root"] = data_root
    return from_dict(Config, data)


def dump_yaml(cfg: Any) -> str:
    """The config as YAML text (the form written beside outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def fingerprint(cfg: Any) -> str:
    """A short stable hash of a config (sha256 of its canonical JSON)."""
    import hashlib
    import json

    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
