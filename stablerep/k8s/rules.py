"""Kubernetes' own rules for the values a manifest carries, checked offline.

The API server refuses a manifest whose toleration, label, node selector, environment variable
name, object name, quantity or image reference breaks its validation rules, but only when the
manifest is applied. These functions apply the same rules before anything is rendered, sent or
compiled, each raising :class:`~stablerep.errors.ConfigError` that names the field.

Sources of the rules: Kubernetes' apimachinery validation (``IsQualifiedName``,
``IsValidLabelValue``, ``IsDNS1123Subdomain``, ``IsEnvVarName``), the core API's toleration
validation, and the distribution project's image reference grammar.
"""

from __future__ import annotations

import re
from typing import Any

from stablerep.errors import ConfigError

INT32_MAX = 2**31 - 1

_NAME_63 = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_QUALIFIED_NAME = re.compile(f"^{_NAME_63}$")
_LABEL_VALUE = re.compile(f"^({_NAME_63})?$")
_DNS_1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_1123_SUBDOMAIN = re.compile(rf"^{_DNS_1123_LABEL}(\.{_DNS_1123_LABEL})*$")
_DNS_1123_LABEL_RE = re.compile(f"^{_DNS_1123_LABEL}$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# distribution/reference: [host[:port]/]path[:tag][@digest], path components lower-case.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"^(?P<name>{_NAME})(?::{_TAG})?(?:@{_DIGEST})?$")
_NAME_MAX = 255

TOLERATION_KEYS = ("key", "operator", "value", "effect", "tolerationSeconds")
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def check_image(where: str, image: Any) -> None:
    """An image reference as a container runtime parses it: [host[:port]/]path[:tag][@digest]."""
    found = _REFERENCE.match(image) if isinstance(image, str) else None
    if not found or len(found.group("name")) > _NAME_MAX:
        raise ConfigError(f"{where}: got {image!r}, expected an image reference "
                          "[host[:port]/]path[:tag][@digest] with a lower-case path, e.g. "
                          "registry.example.com/stablerep:0.1.0-cuda")


def _qualified_name_problem(key: Any) -> str:
    """'' when ``key`` is a qualified name ([DNS-1123 subdomain/]name), else what is wrong."""
    if not isinstance(key, str):
        return "a string"
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_1123_SUBDOMAIN.match(prefix)):
        return "an optional prefix that is a DNS-1123 subdomain (lower-case, at most 253)"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return ("a name of at most 63 letters, digits, '-', '_' or '.', starting and ending "
                "with a letter or digit")
    return ""


def check_label_key(where: str, key: Any) -> None:
    """A label, annotation or node-selector key: ``[prefix/]name`` (a qualified name)."""
    problem = _qualified_name_problem(key)
    if problem:
        raise ConfigError(f"{where}: key {key!r} is not a valid label key; expected "
                          f"[prefix/]name with {problem}")


def check_label_value(where: str, value: Any) -> None:
    """A label or node-selector value: at most 63 of [A-Za-z0-9._-], alphanumeric ends, or ''."""
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ConfigError(f"{where}: got {value!r}, expected a label value (at most 63 letters, "
                          "digits, '-', '_' or '.', starting and ending with a letter or digit, "
                          "or empty)")


def check_labels(where: str, labels: Any) -> None:
    """Every key and value of a label mapping (or a node selector)."""
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}: got {labels!r}, expected a mapping of label keys to values")
    for key, value in labels.items():
        check_label_key(where, key)
        check_label_value(f"{where}.{key}", value)


def check_env_names(where: str, env: Any) -> None:
    """Environment variable names as the API server accepts them: [-._a-zA-Z][-._a-zA-Z0-9]*."""
    for name in env:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(f"{where}: variable name {name!r} is not valid; expected "
                              "letters, digits, '_', '-' or '.', not starting with a digit")


def check_toleration(where: str, tol: Any) -> None:
    """One toleration, by the core API's rules (key, operator, value, effect, seconds)."""
    if not isinstance(tol, dict) or not tol or not set(tol) <= set(TOLERATION_KEYS):
        raise ConfigError(f"{where}: got {tol!r}, expected a mapping of "
                          f"{', '.join(TOLERATION_KEYS)}")
    for name in ("key", "operator", "value", "effect"):
        if name in tol and not isinstance(tol[name], str):
            raise ConfigError(f"{where}.{name}: got {tol[name]!r}, expected a string")
    key, value = tol.get("key", ""), tol.get("value", "")
    operator, effect = tol.get("operator", "Equal"), tol.get("effect", "")
    if operator not in TOLERATION_OPERATORS:
        raise ConfigError(f"{where}.operator: got {operator!r}, expected Equal or Exists")
    _check_toleration_match(where, key, operator, value)
    if effect and effect not in TOLERATION_EFFECTS:
        raise ConfigError(f"{where}.effect: got {effect!r}, expected one of "
                          f"{', '.join(TOLERATION_EFFECTS)} (or none for all effects)")
    if "tolerationSeconds" in tol:
        _check_toleration_seconds(where, tol["tolerationSeconds"], effect)


def _check_toleration_match(where: str, key: str, operator: str, value: str) -> None:
    """The taint a toleration matches: a qualified key (or none with Exists) and its value."""
    if key:
        problem = _qualified_name_problem(key)
        if problem:
            raise ConfigError(f"{where}.key: got {key!r}, expected [prefix/]name with {problem}")
    elif operator != "Exists":
        raise ConfigError(f"{where}.key: missing; expected a taint key (only operator Exists "
                          "may leave it out, to tolerate every taint)")
    if operator == "Exists" and value:
        raise ConfigError(f"{where}.value: got {value!r}, expected none with operator Exists")
    if operator == "Equal":
        check_label_value(f"{where}.value", value)


def _check_toleration_seconds(where: str, seconds: Any, effect: str) -> None:
    """``tolerationSeconds``: an integer, and only with effect NoExecute."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise ConfigError(f"{where}.tolerationSeconds: got {seconds!r}, expected an "
                          "integer number of seconds")
    if effect != "NoExecute":
        raise ConfigError(f"{where}.tolerationSeconds: set with effect {effect!r}; "
                          "expected it only with effect NoExecute")


def check_tolerations(where: str, tolerations: Any) -> None:
    """Every toleration of a list."""
    if not isinstance(tolerations, list):
        raise ConfigError(f"{where}: got {tolerations!r}, expected a list of tolerations")
    for i, tol in enumerate(tolerations):
        check_toleration(f"{where}[{i}]", tol)


def check_int32(where: str, value: int) -> None:
    """A count the API server stores as a 32-bit integer."""
    if value > INT32_MAX:
        raise ConfigError(f"{where}: got {value}, expected at most {INT32_MAX} (a 32-bit "
                          "count)")


def check_subdomain(where: str, value: str) -> None:
    """An object name that must be a DNS-1123 subdomain (service accounts, priority classes)."""
    if not value or len(value) > 253 or not _DNS_1123_SUBDOMAIN.match(value):
        raise ConfigError(f"{where}: got {value!r}, expected a DNS-1123 subdomain (lower-case "
                          "letters, digits, '-' and '.', at most 253)")


def check_dns_label(where: str, value: str) -> None:
    """A name that must be a DNS-1123 label (namespaces)."""
    if not value or len(value) > 63 or not _DNS_1123_LABEL_RE.match(value):
        raise ConfigError(f"{where}: got {value!r}, expected a DNS-1123 label (at most 63 "
                          "lower-case letters, digits and '-', starting and ending with a "
                          "letter or digit)")
