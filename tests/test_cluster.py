"""Every YAML under cluster/ and jobs/runtime_env.yaml loads and validates: KubeRay manifests
against the KubeRay CRD schemas vendored in cluster/kuberay/crds (unknown fields rejected, as
`kubectl apply --validate=strict` does), the runtime env against what `ray job submit` needs."""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "cluster" / "kuberay" / "crds"  # vendored: see SOURCE.md there
MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(schema):
    """Close every object schema that lists its properties (Kubernetes prunes or, with strict
    validation, rejects unknown fields; plain JSON Schema would accept them silently)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def _crd_schema(kind: str) -> dict:
    path = SCHEMAS / CRD_FILES[kind]
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is ObjectMeta, validated by the API server itself, not by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def test_there_are_cluster_and_job_manifests():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_against_kuberay_crd(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _crd_schema(doc["kind"]))
    assert path.read_text().startswith("#"), "each manifest starts with how to apply and watch it"


def test_strict_validation_catches_a_typo():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster-cpu.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of `replicas`
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(doc, _crd_schema("RayCluster"))
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-dpo-tiny-cpu.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"  # wrong type
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema("RayJob"))


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_rayjob_runtime_env_and_entrypoint(path):
    doc = yaml.safe_load(path.read_text())
    if doc["kind"] != "RayJob":
        return
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "py_modules", "pip", "env_vars", "excludes", "uv", "conda", "config"}
    assert "rayalign" in doc["spec"]["entrypoint"]
    config = next(t for t in doc["spec"]["entrypoint"].split() if t.startswith("jobs/"))
    assert (ROOT / config).exists(), f"{path.name}: entrypoint names a missing job config {config}"


def _excluded(rel: str, patterns: list[str]) -> bool:
    """gitignore-style matching as Ray applies `excludes` (dir/ patterns match a prefix)."""
    parts = rel.split("/")
    for pat in patterns:
        bare = pat.rstrip("/").removeprefix("**/")
        for i in range(len(parts)):
            if fnmatch.fnmatch(parts[i], bare) or fnmatch.fnmatch("/".join(parts[: i + 1]), bare):
                return True
    return False


def test_runtime_env_keeps_weights_and_outputs_out_of_the_upload():
    env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    excludes = env["excludes"]
    for rel in (".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", ".git/objects/ab/cd",
                "outputs/dpo-tiny/checkpoint-20/model.safetensors", "outputs/demo/metrics.jsonl",
                "models/qwen/model-00001-of-00002.safetensors", "rayalign/__pycache__/config.cpython-311.pyc",
                "runs/x/checkpoint-5/optimizer.pt", "data/uf/train.parquet"):
        assert _excluded(rel, excludes), rel
    for rel in ("rayalign/config.py", "jobs/dpo-tiny.yaml", "pyproject.toml"):
        assert not _excluded(rel, excludes), rel


def test_cluster_launcher_yaml_validates_against_ray_schema():
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    for path in sorted((ROOT / "cluster" / "launcher").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        jsonschema.validate(doc, schema)
        assert doc["head_node_type"] in doc["available_node_types"], path.name
