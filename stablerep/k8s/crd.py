"""The CRD schemas of the training jobs, shipped with the package, and checks against them.

An API server validates a custom resource against its CustomResourceDefinition's OpenAPI
schema and silently prunes fields the schema does not define. The schemas of PyTorchJob
(``kubeflow.org/v1``, Training Operator release 1.9), TrainJob and ClusterTrainingRuntime
(``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer) ship in ``stablerep/k8s/schemas/`` as
gzipped JSON (only ``openAPIV3Schema`` of each CRD; the CRDs are Apache-2.0), so the pipeline's
validate step, ``k8s render`` and the launcher refuse a job the cluster would refuse, before
anything runs. :func:`schema_problems` lists what breaks the schema (types, enums, required
fields) and the fields it would prune.

``python -m stablerep.k8s.crd DIR`` rewrites the shipped files from a folder of CRD YAMLs
(``make crd-schemas``); a test keeps them equal to the CRDs the project validates against.
"""

from __future__ import annotations

import functools
import gzip
import json
import sys
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: kind -> (the shipped file, the CRD file it is taken from)
CRDS = {
    "PyTorchJob": ("pytorchjob.json.gz", "kubeflow.org_pytorchjobs.yaml"),
    "TrainJob": ("trainjob.json.gz", "trainer.kubeflow.org_trainjobs.yaml"),
    "ClusterTrainingRuntime": ("clustertrainingruntime.json.gz",
                               "trainer.kubeflow.org_clustertrainingruntimes.yaml"),
}


@functools.cache
def _validator(kind: str) -> Any:
    import jsonschema

    doc = json.loads(gzip.decompress((SCHEMAS / CRDS[kind][0]).read_bytes()))
    schema = doc["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)  # as jsonschema.validate picks it
    return cls(schema)


def schema(kind: str) -> dict[str, Any]:
    """The shipped ``openAPIV3Schema`` of ``kind`` (PyTorchJob, TrainJob, ClusterTrainingRuntime)."""
    return _validator(kind).schema


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(the object)"


def pruned_fields(obj: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``obj`` that the schema ``node`` does not define (the server would drop them)."""
    found: list[str] = []
    if isinstance(obj, dict) and "properties" in node:
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if key in node["properties"]:
                found += pruned_fields(value, node["properties"][key], where)
            elif not node.get("additionalProperties") and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                found.append(where)
    elif isinstance(obj, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += pruned_fields(value, node["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(node.get("items"), dict):
        for i, value in enumerate(obj):
            found += pruned_fields(value, node["items"], f"{path}[{i}]")
    return found


def schema_problems(manifest: dict[str, Any]) -> list[str]:
    """What in ``manifest`` its kind's CRD schema refuses or would prune; [] when it passes.

    Kinds without a shipped schema pass (the API server checks built-in kinds itself).
    """
    kind = manifest.get("kind")
    if kind not in CRDS:
        return []
    validator = _validator(kind)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    problems = [f"{_path(e.absolute_path)}: {e.message[:200]}" for e in errors]
    problems += [f"{where}: not a field of the {kind} schema (the API server would drop it)"
                 for where in pruned_fields(manifest, validator.schema)]
    return problems


def vendor(crd_dir: str | Path, out: str | Path = SCHEMAS) -> list[Path]:
    """Write the shipped schema files from the CRD YAMLs in ``crd_dir``; returns the paths."""
    import yaml

    written = []
    for kind, (name, source) in CRDS.items():
        crd = yaml.safe_load((Path(crd_dir) / source).read_text())
        version = crd["spec"]["versions"][0]
        doc = {"apiVersion": f"{crd['spec']['group']}/{version['name']}", "kind": kind,
               "openAPIV3Schema": version["schema"]["openAPIV3Schema"]}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        path = Path(out) / name
        path.write_bytes(gzip.compress(data, mtime=0))
        written.append(path)
    return written


if __name__ == "__main__":
    for written in vendor(sys.argv[1] if len(sys.argv) > 1 else "../shared/schemas"):
        print(f"crd: wrote {written}")
