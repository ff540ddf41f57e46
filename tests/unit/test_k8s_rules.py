"""Kubernetes' own rules applied offline (stablerep.k8s.rules): the image reference grammar,
tolerations, label keys and values, environment variable names, names and 32-bit counts.
Valid values of each kind pass; each invalid one fails with a message naming the field."""

from __future__ import annotations

import pytest

from stablerep.errors import ConfigError
from stablerep.k8s import rules

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("image", [
    "ubuntu", "ubuntu:22.04", "docker.io/stablerep/stablerep:0.1.0-cuda",
    "localhost:5000/team/app", "us-docker.pkg.dev/p/r/stablerep:1.0", f"app@{DIGEST}",
    f"registry.example.com:443/a/b:v1@{DIGEST}", "a__b/c-d.e:TAG_1", "[::1]:5000/app:x",
    "Registry.Example.com/app",  # the host may have capitals, the path may not
])
def test_valid_image_references_pass(image: str) -> None:
    rules.check_image("image", image)


@pytest.mark.parametrize("image", [
    "", "Not:An:Image!!", "not an image", "team/UPPER", "app:", "app:-tag", "app@sha256:abc",
    "/app", "app/", "a//b", "app:" + "t" * 129, "a" * 256, "host:port/app",
])
def test_invalid_image_references_are_named(image: str) -> None:
    with pytest.raises(ConfigError, match=r"^pod.image: got .*, expected an image reference"):
        rules.check_image("pod.image", image)


@pytest.mark.parametrize("tol", [
    {"operator": "Exists"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "dedicated", "value": "gpu", "effect": "NoExecute", "tolerationSeconds": 30},
    {"key": "dedicated", "operator": "Equal", "value": ""},
])
def test_valid_tolerations_pass(tol: dict) -> None:
    rules.check_toleration("t", tol)


@pytest.mark.parametrize(("tol", "message"), [
    ({"operator": "Equal", "value": "x"}, "t.key: missing"),
    ({"key": "a", "operator": "Sometimes"}, "t.operator: got 'Sometimes', expected Equal or "
                                            "Exists"),
    ({"key": "a", "operator": "Exists", "value": "x"}, "t.value: got 'x', expected none"),
    ({"key": "a", "effect": "Never"}, "t.effect: got 'Never', expected one of NoSchedule"),
    ({"key": "a", "effect": "NoExecute", "tolerationSeconds": "soon"},
     "t.tolerationSeconds: got 'soon', expected an integer"),
    ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5},
     "t.tolerationSeconds: set with effect 'NoSchedule'"),
    ({"key": "a b"}, "t.key: got 'a b', expected"),
    ({"key": "a", "value": "a b"}, "t.value: got 'a b', expected a label value"),
    ({"key": "a", "colour": "red"}, "t: got .*, expected a mapping of key"),
])
def test_invalid_tolerations_are_named(tol: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        rules.check_toleration("t", tol)


@pytest.mark.parametrize("key", ["app", "cloud.google.com/gke-accelerator", "a.b_c-d",
                                 "x" * 63, "example.com/" + "x" * 63])
def test_valid_label_keys_pass(key: str) -> None:
    rules.check_labels("labels", {key: "v"})


@pytest.mark.parametrize("key", ["a b", "", "-a", "a-", "x" * 64, "Example.com/a", "/a",
                                 "a/b/c", "example.com/"])
def test_invalid_label_keys_are_named(key: str) -> None:
    with pytest.raises(ConfigError, match=r"^labels: key .* is not a valid label key"):
        rules.check_labels("labels", {key: "v"})


@pytest.mark.parametrize(("value", "ok"), [("", True), ("a.b-c_D", True), ("x" * 63, True),
                                           ("x" * 64, False), ("a b", False), ("-a", False),
                                           (3, False)])
def test_label_values(value: object, ok: bool) -> None:
    if ok:
        rules.check_label_value("labels.k", value)
    else:
        with pytest.raises(ConfigError, match=r"^labels.k: got .*, expected a label value"):
            rules.check_label_value("labels.k", value)


def test_env_names_counts_and_names() -> None:
    rules.check_env_names("env", ["A", "_b", "c.d-e", "-x"])
    for bad in ("", "1A", "A B", "A=B"):
        with pytest.raises(ConfigError, match=f"^env: variable name {bad!r} is not valid"):
            rules.check_env_names("env", [bad])
    rules.check_int32("n", 2**31 - 1)
    with pytest.raises(ConfigError, match=r"^n: got 2147483648, expected at most 2147483647"):
        rules.check_int32("n", 2**31)
    rules.check_subdomain("sa", "my-sa.team")
    with pytest.raises(ConfigError, match="^sa: got 'My SA', expected a DNS-1123 subdomain"):
        rules.check_subdomain("sa", "My SA")
    rules.check_dns_label("ns", "ml-training")
    with pytest.raises(ConfigError, match="^ns: got 'a.b', expected a DNS-1123 label"):
        rules.check_dns_label("ns", "a.b")
