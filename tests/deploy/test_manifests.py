"""deploy/k8s, rendered and validated offline (`make deploy-check`): every overlay renders with kustomize, every
object passes the Kubernetes schemas strictly (kubernetes-validate) and every KEDA object KEDA's models strictly
(npm's @kubernetes-models/keda, pinned in tests/deploy/keda: their schema check and TypeScript's), every YAML file
passes yamllint, and the objects keep the promises deploy/k8s/README.md makes: the KEDA trigger's SQL is
deploy/keda/inflight.sql, workers outlive their longest task (the batch worker its longest batch task), beat is
alone, pods wait for migrations.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    K8S,
    KEDA_MODELS,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    ROOT,
    KedaProblem,
    KedaValidationError,
    config_value,
    containers,
    inflight_query,
    keda_problems,
    main_container,
    named,
    of_kind,
    pod_spec,
    render,
    validate,
)

ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
APP_COMPONENTS = ("web", "beat", "housekeeping", "batch", "worker")
FORMULA = re.compile(r"max\(in_flight, queued\) \+ (\d+)")

# Each promise is checked on every overlay.
per_overlay = pytest.mark.parametrize("overlay", OVERLAYS)


def app_workloads(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [
        each
        for each in (*of_kind(objects, "Deployment"), *of_kind(objects, "Job"))
        if each["metadata"]["labels"].get("app.kubernetes.io/component") in (*APP_COMPONENTS, "migrate")
    ]


def worker_class(deployment: dict[str, Any]) -> str:
    args = main_container(deployment)["args"]
    assert args[0] == "worker"
    return str(args[1])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# Rendered and valid.


@per_overlay
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_strictly(overlay: str, version: str) -> None:
    objects = render(overlay)
    assert objects
    validate(objects, version)


def refused_at(error: KedaValidationError, path: str) -> list[KedaProblem]:
    return [problem for problem in error.problems if problem.path == path]


@per_overlay
def test_an_unknown_field_is_refused(overlay: str) -> None:
    """The validators are strict: a misspelt field fails, in a Kubernetes kind and in a KEDA kind alike."""
    objects = render(overlay)
    deployment = copy.deepcopy(of_kind(objects, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([deployment], KUBERNETES_VERSIONS[-1])
    scaled_object = copy.deepcopy(of_kind(objects, "ScaledObject")[0])
    scaled_object["spec"]["minReplicas"] = 1
    trigger_auth = copy.deepcopy(of_kind(objects, "TriggerAuthentication")[0])
    trigger_auth["spec"]["secretTargetRef"][0]["secret"] = "x"
    with pytest.raises(KedaValidationError) as refused:
        validate([scaled_object, trigger_auth], KUBERNETES_VERSIONS[-1])
    assert refused_at(refused.value, "spec.minReplicas")[0].name == scaled_object["metadata"]["name"]
    assert refused_at(refused.value, "spec.secretTargetRef[0].secret")[0].name == trigger_auth["metadata"]["name"]


def worker_scaled_object(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    [first, *_] = [
        each for each in of_kind(objects, "ScaledObject") if each["metadata"]["name"].startswith("platform-worker-")
    ]
    return copy.deepcopy(first)


def trigger_authentication(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return copy.deepcopy(of_kind(objects, "TriggerAuthentication")[0])


Pick = Callable[[tuple[dict[str, Any], ...]], dict[str, Any]]


def changed(pick: Pick, change: Callable[[dict[str, Any]], object]) -> Pick:
    """An object picked from an overlay's, with one change."""

    def mutant(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
        document = pick(objects)
        change(document)
        return document

    return mutant


# (a broken KEDA object, the checks of validate.mjs that must refuse it, each with the path it names, the field's name)
# The schema check alone lets unknown fields through; TypeScript's check alone is what refuses them.
KEDA_REFUSALS: dict[str, tuple[Pick, dict[str, str], str]] = {
    "unknown field": (
        changed(worker_scaled_object, lambda each: each["spec"].update(minReplicas=1)),
        {"typescript": "spec.minReplicas"},
        "minReplicas",
    ),
    "unknown field, deep": (
        changed(worker_scaled_object, lambda each: each["spec"]["advanced"]["scalingModifiers"].update(formulas="1")),
        {"typescript": "spec.advanced.scalingModifiers.formulas"},
        "formulas",
    ),
    "unknown field in a list": (
        changed(trigger_authentication, lambda each: each["spec"]["secretTargetRef"][1].update(secret="x")),
        {"typescript": "spec.secretTargetRef[1].secret"},
        "secret",
    ),
    "wrong type": (
        changed(worker_scaled_object, lambda each: each["spec"].update(minReplicaCount="1")),
        {"schema": "spec.minReplicaCount", "typescript": "spec.minReplicaCount"},
        "minReplicaCount",
    ),
    "wrong type in a trigger's metadata": (
        changed(worker_scaled_object, lambda each: each["spec"]["triggers"][0]["metadata"].update(targetQueryValue=1)),
        {
            "schema": "spec.triggers[0].metadata.targetQueryValue",
            "typescript": "spec.triggers[0].metadata.targetQueryValue",
        },
        "targetQueryValue",
    ),
    "value outside an enum": (
        changed(worker_scaled_object, lambda each: each["spec"]["fallback"].update(behavior="sometimes")),
        {"schema": "spec.fallback.behavior", "typescript": "spec.fallback.behavior"},
        "behavior",
    ),
    "missing required field": (
        changed(worker_scaled_object, lambda each: each["spec"].pop("scaleTargetRef")),
        # TypeScript says it of the object that lacks it.
        {"schema": "spec.scaleTargetRef", "typescript": "spec"},
        "scaleTargetRef",
    ),
    "unknown field in the metadata": (
        changed(trigger_authentication, lambda each: each["metadata"].update(label={"a": "b"})),
        {"typescript": "metadata.label"},
        "label",
    ),
    "no such kind": (
        changed(worker_scaled_object, lambda each: each.update(kind="ScaledObjects")),
        {"kind": ""},
        "ScaledObjects",
    ),
}


@pytest.fixture(scope="module")
def keda_refusals() -> dict[str, tuple[KedaProblem, ...]]:
    """Each broken object of KEDA_REFUSALS (from the large overlay, which has every KEDA kind) and what validate.mjs
    said of it: all of them in one run, as deploy-check checks an overlay's."""
    objects = render("large")
    broken = {case: mutant(objects) for case, (mutant, _, _) in KEDA_REFUSALS.items()}
    names = {case: f"broken-{index}" for index, case in enumerate(broken)}
    for case, document in broken.items():
        document["metadata"]["name"] = names[case]
    problems = keda_problems(list(broken.values()))
    return {case: tuple(problem for problem in problems if problem.name == names[case]) for case in broken}


@pytest.mark.parametrize("case", KEDA_REFUSALS)
def test_keda_checks_refuse_naming_the_field(case: str, keda_refusals: dict[str, tuple[KedaProblem, ...]]) -> None:
    _, expected, field = KEDA_REFUSALS[case]
    problems = keda_refusals[case]
    for check, path in expected.items():
        named_it = [each for each in problems if each.check == check and each.path == path and field in str(each)]
        assert named_it, f"the {check} check did not refuse {path} naming {field}: {[str(each) for each in problems]}"


def test_the_unbroken_objects_pass_both_checks() -> None:
    """The cases above are refused for what was broken in them: the same objects unbroken pass."""
    objects = render("large")
    assert keda_problems([worker_scaled_object(objects), trigger_authentication(objects)]) == ()


def test_without_node_the_keda_check_fails_saying_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CI has Node.js and npm; a machine without them fails deploy-check with the reason, it never skips it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    objects = render("small")
    unchecked = worker_scaled_object(objects)
    unchecked["metadata"]["name"] = "not-checked-before"  # no answer cached from an earlier run
    with pytest.raises(
        pytest.fail.Exception, match=re.escape("Node.js 20 and npm are needed for validating KEDA's objects")
    ):
        keda_problems([unchecked])


def test_the_readmes_name_the_pinned_keda_models() -> None:
    """deploy/keda/README.md, deploy/k8s/README.md and the README's production section name the versions the lock file
    installs, so what they say is what deploy-check ran."""
    manifest = json.loads((KEDA_MODELS / "package.json").read_text())
    lock = json.loads((KEDA_MODELS / "package-lock.json").read_text())
    pinned = {name: lock["packages"][f"node_modules/{name}"]["version"] for name in manifest["dependencies"]}
    assert set(pinned) == {"@kubernetes-models/keda", "typescript"}
    assert manifest["dependencies"] == pinned  # exact versions, no ranges
    production = (ROOT / "README.md").read_text().split("## Running in production", 1)[1].split("\n## ", 1)[0]
    for text in ((ROOT / "deploy" / "keda" / "README.md").read_text(), (K8S / "README.md").read_text(), production):
        for name, version in pinned.items():
            assert f"{name}@{version}" in text


def test_the_lock_file_fetches_from_npm_only() -> None:
    lock = json.loads((KEDA_MODELS / "package-lock.json").read_text())
    packages = {path: entry for path, entry in lock["packages"].items() if path}
    assert packages
    for path, entry in packages.items():
        assert entry["resolved"].startswith("https://registry.npmjs.org/"), (path, entry["resolved"])
        assert entry["integrity"].startswith("sha512-"), path


def test_yamllint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / "deploy" / ".yamllint.yaml"), "deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Every image, every container.


@per_overlay
def test_images_are_the_platforms_and_tagged(overlay: str) -> None:
    for workload in (*of_kind(render(overlay), "Deployment"), *of_kind(render(overlay), "Job")):
        for container in containers(workload):
            name, _, tag = container["image"].partition(":")
            assert name in ("platform", "platform-cuda", "platform-pgbouncer"), container["image"]
            assert tag
            assert tag != "latest"


@per_overlay
def test_every_container_runs_unprivileged_as_the_images_user(overlay: str) -> None:
    users = dict(re.findall(r"FROM \S+ AS (runtime|pgbouncer)(?:.|\n)*?USER (\d+):", DOCKERFILE.read_text()))
    for workload in (*of_kind(render(overlay), "Deployment"), *of_kind(render(overlay), "Job")):
        security = pod_spec(workload)["securityContext"]
        assert security["runAsNonRoot"] is True
        image_stage = "pgbouncer" if workload["metadata"]["name"].endswith("pgbouncer") else "runtime"
        assert str(security["runAsUser"]) == users[image_stage]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec(workload)["automountServiceAccountToken"] is False
        for container in containers(workload):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert "memory" in container["resources"]["limits"]
            assert "cpu" in container["resources"]["requests"]


@per_overlay
def test_every_process_type_is_one_the_entrypoint_knows(overlay: str) -> None:
    known = set(re.findall(r"^    ([a-z-]+)\)$", ENTRYPOINT.read_text(), re.MULTILINE))
    assert {"web", "worker", "housekeeping", "batch", "beat", "migrate", "wait-for-migrations"} <= known
    objects = render(overlay)
    for workload in app_workloads(objects):
        for container in containers(workload):
            assert container["args"][0] in known, container["args"]
    # Every component runs: each long-running process type has a Deployment (a worker class per overlay).
    running = {main_container(each)["args"][0] for each in of_kind(objects, "Deployment")}
    assert {"web", "worker", "housekeeping", "batch", "beat"} <= running
    for deployment in of_kind(objects, "Deployment"):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        assert component in (*APP_COMPONENTS, "pgbouncer"), f"{deployment['metadata']['name']}: {component}"


@per_overlay
def test_every_platform_pod_waits_for_the_migrations_the_job_runs(overlay: str) -> None:
    objects = render(overlay)
    [job] = of_kind(objects, "Job")
    assert main_container(job)["args"] == ["migrate"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    for workload in app_workloads(objects):
        if workload["kind"] == "Job":
            continue
        [init] = pod_spec(workload)["initContainers"]
        assert init["args"] == ["wait-for-migrations"]
        assert init["image"] == main_container(workload)["image"]  # the release's own migrations
        assert "DATABASE_URL" not in env_of(init)  # PostgreSQL itself, as the Job, never through PgBouncer


@per_overlay
def test_secrets_come_from_existing_secrets_the_readme_lists(overlay: str) -> None:
    """No Secret is rendered: every one is made before the release, and deploy/k8s/README.md names each with its
    keys."""
    objects = render(overlay)
    assert not of_kind(objects, "Secret")
    readme = (K8S / "README.md").read_text()
    referenced: set[tuple[str, str | None]] = set()
    for workload in (*of_kind(objects, "Deployment"), *of_kind(objects, "Job")):
        for container in containers(workload):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    referenced.add((source["secretRef"]["name"], None))
            for entry in container.get("env", []):
                secret = entry.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    referenced.add((secret["name"], secret["key"]))
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                referenced.add((volume["secret"]["secretName"], None))
    for auth in of_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            referenced.add((ref["name"], ref["key"]))
    assert referenced
    for name, key in referenced:
        assert f"`{name}`" in readme, f"deploy/k8s/README.md does not name the Secret {name}"
        if key:
            assert f"`{key}`" in readme, f"deploy/k8s/README.md does not name the key {key} of {name}"


@per_overlay
def test_selectors_select_their_pods(overlay: str) -> None:
    objects = render(overlay)
    pods = [
        (workload["metadata"]["name"], workload["spec"]["template"]["metadata"]["labels"])
        for workload in of_kind(objects, "Deployment")
    ]

    def selected(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pods if selector.items() <= labels.items()]

    for deployment in of_kind(objects, "Deployment"):
        assert selected(deployment["spec"]["selector"]["matchLabels"]) == [deployment["metadata"]["name"]]
    for service in of_kind(objects, "Service"):
        assert len(selected(service["spec"]["selector"])) == 1
    for budget in of_kind(objects, "PodDisruptionBudget"):
        assert len(selected(budget["spec"]["selector"]["matchLabels"])) == 1


# Web.


@per_overlay
def test_web_probes_drains_and_scales(overlay: str) -> None:
    objects = render(overlay)
    web = named(objects, "Deployment", "platform-web")
    container = main_container(web)
    assert container["args"] == ["web"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "replicas" not in web["spec"]  # the HPA's
    # preStop sleeps while the endpoint leaves the load balancers; then gunicorn's graceful timeout; then SIGKILL.
    sleep_command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_command[0] == "sleep"
    graceful = int(env_of(container)["WEB_GRACEFUL_TIMEOUT"]["value"])
    assert 'os.environ.get("WEB_GRACEFUL_TIMEOUT"' in GUNICORN_CONF.read_text()
    assert pod_spec(web)["terminationGracePeriodSeconds"] > int(sleep_command[1]) + graceful
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    hpa = named(objects, "HorizontalPodAutoscaler", "platform-web")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "platform-web"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    budget = named(objects, "PodDisruptionBudget", "platform-web")
    assert budget["spec"]["selector"]["matchLabels"].items() <= web["spec"]["template"]["metadata"]["labels"].items()


# Beat.


@per_overlay
def test_beat_is_exactly_one_recreated_never_autoscaled(overlay: str) -> None:
    objects = render(overlay)
    beat = named(objects, "Deployment", "platform-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert main_container(beat)["args"] == ["beat"]
    targets = {each["spec"]["scaleTargetRef"]["name"] for each in of_kind(objects, "HorizontalPodAutoscaler")}
    targets |= {each["spec"]["scaleTargetRef"]["name"] for each in of_kind(objects, "ScaledObject")}
    assert "platform-beat" not in targets
    assert [each for each in app_workloads(objects) if main_container(each)["args"][0] == "beat"] == [beat]


# Workers and KEDA.


@per_overlay
def test_housekeeping_scales_on_its_queue(overlay: str) -> None:
    objects = render(overlay)
    deployment = named(objects, "Deployment", "platform-housekeeping")
    assert main_container(deployment)["args"][0] == "housekeeping"
    scaled = named(objects, "ScaledObject", "platform-housekeeping")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "platform-housekeeping"
    assert scaled["spec"]["minReplicaCount"] >= 1  # beat's periodic tasks always have a worker
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == "default"  # CELERY_TASK_DEFAULT_QUEUE


def batch_task_limits(objects: tuple[dict[str, Any], ...]) -> dict[str, int]:
    """The hard time limit of every task settings' CELERY_TASK_ROUTES sends to the batch queue, as the pods get it (a
    task without its own takes the ConfigMap's CELERY_TASK_TIME_LIMIT)."""
    from config.celery import app

    app.loader.import_default_modules()
    default = int(config_value(objects, "CELERY_TASK_TIME_LIMIT") or 900)
    limits = {
        name: int(getattr(task, "time_limit", None) or default)
        for name, task in app.tasks.items()
        if app.amqp.router.route({}, name)["queue"].name == "batch"
    }
    assert "billing.reconcile" in limits
    return limits


@per_overlay
def test_batch_is_one_worker_that_outlives_its_longest_task(overlay: str) -> None:
    """The long periodic tasks' worker: exactly one, never autoscaled, and stopping it (a rollout, a node drain) lets
    the task it runs finish, however long the longest may last (billing.reconcile's hard limit, 3600 s)."""
    objects = render(overlay)
    deployment = named(objects, "Deployment", "platform-batch")
    assert main_container(deployment)["args"] == ["batch"]
    assert deployment["spec"]["replicas"] == 1
    targets = {each["spec"]["scaleTargetRef"]["name"] for each in of_kind(objects, "HorizontalPodAutoscaler")}
    targets |= {each["spec"]["scaleTargetRef"]["name"] for each in of_kind(objects, "ScaledObject")}
    assert "platform-batch" not in targets
    assert [each for each in app_workloads(objects) if main_container(each)["args"][0] == "batch"] == [deployment]
    limits = batch_task_limits(objects)
    longest = max(limits.values())
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > longest, limits
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Its documented grace period is the one it has.
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert f"grace period ({grace} s)" in (K8S / "README.md").read_text()


@per_overlay
def test_one_worker_deployment_per_class_each_scaled_by_keda(overlay: str) -> None:
    objects = render(overlay)
    workers = [each for each in of_kind(objects, "Deployment") if main_container(each)["args"][0] == "worker"]
    classes = [worker_class(each) for each in workers]
    assert classes
    assert len(set(classes)) == len(classes)
    scaled = {each["spec"]["scaleTargetRef"]["name"]: each for each in of_kind(objects, "ScaledObject")}
    deployments = {each["metadata"]["name"] for each in of_kind(objects, "Deployment")}
    assert set(scaled) <= deployments  # every ScaledObject scales a Deployment that is rendered
    for worker in workers:
        assert worker["metadata"]["name"] in scaled
        assert "replicas" not in worker["spec"]  # KEDA's


@per_overlay
def test_the_keda_trigger_is_inflight_sql_and_the_queue_is_the_class(overlay: str) -> None:
    objects = render(overlay)
    auths = {each["metadata"]["name"] for each in of_kind(objects, "TriggerAuthentication")}
    for deployment in of_kind(objects, "Deployment"):
        if main_container(deployment)["args"][0] != "worker":
            continue
        gpu_class = worker_class(deployment)
        [scaled] = [
            each
            for each in of_kind(objects, "ScaledObject")
            if each["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        ]
        triggers = {trigger["name"]: trigger for trigger in scaled["spec"]["triggers"]}
        assert set(triggers) == {"in_flight", "queued"}
        postgresql, redis = triggers["in_flight"], triggers["queued"]
        assert postgresql["type"] == "postgresql"
        assert postgresql["metadata"]["query"] == inflight_query(gpu_class)
        assert redis["type"] == "redis"
        assert redis["metadata"]["listName"] == gpu_class  # the Celery queue is named after the class
        for trigger in triggers.values():
            assert trigger["authenticationRef"]["name"] in auths
            assert trigger["metadata"].keys().isdisjoint({"password", "connectionString", "address", "host"})


@per_overlay
def test_every_class_has_a_warm_floor_and_a_buffer(overlay: str) -> None:
    for scaled in of_kind(render(overlay), "ScaledObject"):
        if scaled["metadata"]["name"] == "platform-housekeeping":
            continue
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        modifiers = spec["advanced"]["scalingModifiers"]
        match = FORMULA.fullmatch(modifiers["formula"])
        assert match, modifiers["formula"]
        buffer = int(match.group(1))
        # Active only with work in flight: with none, the class rests at its floor (zero scales it away).
        assert modifiers["activationTarget"] == str(buffer)
        assert modifiers["target"] == "1"  # one job per worker
        assert modifiers["metricType"] == "AverageValue"
        assert spec["fallback"]["replicas"] >= 1


@per_overlay
def test_a_worker_finishes_its_job_before_it_is_stopped(overlay: str) -> None:
    objects = render(overlay)
    time_limit = int(config_value(objects, "CELERY_TASK_TIME_LIMIT") or 900)
    soft_limit = int(config_value(objects, "CELERY_TASK_SOFT_TIME_LIMIT") or 840)
    assert soft_limit < time_limit
    for deployment in of_kind(objects, "Deployment"):
        if main_container(deployment)["args"][0] != "worker":
            continue
        template = deployment["spec"]["template"]
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > time_limit
        assert template["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@per_overlay
def test_gpu_classes_get_a_gpu_on_their_nodes_and_the_weights(overlay: str) -> None:
    objects = render(overlay)
    for deployment in of_kind(objects, "Deployment"):
        if main_container(deployment)["args"][0] != "worker":
            continue
        container, spec = main_container(deployment), pod_spec(deployment)
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert mounts["model-weights"]["readOnly"] is True
        assert mounts["model-weights"]["mountPath"] == config_value(objects, "MODELS_DIR")
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        claim = volumes["model-weights"]["persistentVolumeClaim"]["claimName"]
        named(objects, "PersistentVolumeClaim", claim)
        if worker_class(deployment) == "cpu":
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            assert container["image"].startswith("platform:")
            continue
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].startswith("platform-cuda:")
        assert spec["nodeSelector"]["nvidia.com/gpu.product"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


# PgBouncer, where an overlay has it.


@per_overlay
def test_pgbouncer_in_transaction_mode_for_the_app_not_for_migrations(overlay: str) -> None:
    objects = render(overlay)
    pgbouncer = [each for each in of_kind(objects, "Deployment") if each["metadata"]["name"] == "platform-pgbouncer"]
    for workload in app_workloads(objects):
        env = env_of(main_container(workload))
        if not pgbouncer or workload["kind"] == "Job":
            assert "DATABASE_TRANSACTION_POOLING" not in env
            assert "DATABASE_URL" not in env
            continue
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "PGBOUNCER_DATABASE_URL"
        assert env["DATABASE_TRANSACTION_POOLING"]["value"] == "1"
    if not pgbouncer:
        return
    [config] = [each for each in of_kind(objects, "ConfigMap") if each["metadata"]["name"].startswith("platform-pg")]
    ini = config["data"]["pgbouncer.ini"]
    assert re.search(r"^pool_mode = transaction$", ini, re.MULTILINE)
    listen_port = re.search(r"^listen_port = (\d+)$", ini, re.MULTILINE)
    assert listen_port
    service = named(objects, "Service", "platform-pgbouncer")
    assert service["spec"]["ports"][0]["port"] == int(listen_port.group(1))
    args = main_container(pgbouncer[0])["args"]
    assert shlex.join(args) == "/etc/pgbouncer/pgbouncer.ini"


@per_overlay
def test_overlays_are_the_ones_the_readme_describes(overlay: str) -> None:
    readme = (K8S / "README.md").read_text()
    assert f"deploy/k8s/overlays/{overlay}" in readme
    assert Path(K8S / "overlays" / overlay / "kustomization.yaml").exists()
