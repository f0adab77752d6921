"""deploy/kubernetes: every manifest valid against Kubernetes' own schemas, and what a reviewer checks.

``kubernetes-validate`` (the dev extra) ships the official OpenAPI schemas of each Kubernetes
release, so the check runs offline. Strict mode refuses fields the schema does not know, which is
how a misspelled or misplaced key (``livenessprobe``, ``resources`` under the pod) shows up. The
semantic checks cover what the schemas cannot: that the probes call the gRPC health service on the
gRPC port, that a pod gets time to drain, that the Services and the PodDisruptionBudget select the
Deployment's pods, and that Redis persists what it acknowledges.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

from ._engine import ROOT

KUBE_DIR = ROOT / "deploy" / "kubernetes"
# Fixed, so a release of kubernetes-validate cannot change the verdict; gRPC probes are GA since 1.27
KUBERNETES_VERSION = "1.30.0"
GRPC_PORT = 50051
METRICS_PORT = 9464
STORE = "redis://redis:6379/0"
SERVER_GRACE_DEFAULT = 10.0  # normserve serve's --grace-seconds when none is given
# Manifests that kustomization.yaml leaves out on purpose, each one's reason in its header
ALTERNATES = {"deployment-gpu.yaml", "secret.example.yaml"}
DEPLOYMENTS = ["deployment.yaml", "deployment-gpu.yaml"]

Doc = dict[str, Any]


def _need(what: str) -> NoReturn:
    message = f"{what} not found: pip install -e '.[dev]' to check deploy/kubernetes"
    if os.environ.get("NORMSERVE_REQUIRE_CONTAINER"):
        pytest.fail(message)
    pytest.skip(message)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        _need("PyYAML")
    return yaml


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _need("kubernetes-validate")
    return kubernetes_validate


def _files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(name: str) -> list[Doc]:
    docs = [d for d in _yaml().safe_load_all((KUBE_DIR / name).read_text()) if d]
    assert docs, f"{name} holds no manifest"
    return docs


def _one(name: str, kind: str, metadata_name: str | None = None) -> Doc:
    found = [
        d
        for d in _docs(name)
        if d["kind"] == kind and metadata_name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, f"{name}: expected one {kind} {metadata_name or ''}, got {len(found)}"
    return found[0]


def _container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def _flag(container: Doc, flag: str) -> str | None:
    """The value of ``--flag VALUE`` (or ``--flag=VALUE``) in args, else of NORMSERVE_FLAG."""
    args = [str(a) for a in container.get("args", [])]
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    env = "NORMSERVE_" + flag.removeprefix("--").replace("-", "_").upper()
    for item in container.get("env", []):
        if item["name"] == env:
            return item.get("value")
    return None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _compose_image() -> str:
    compose = _yaml().safe_load((ROOT / "compose.yaml").read_text())
    return str(compose["services"]["normserve"]["image"])


# ---- schemas ----------------------------------------------------------------------------------


def test_there_are_manifests() -> None:
    assert {p.name for p in _files()} >= {
        "deployment.yaml",
        "deployment-gpu.yaml",
        "service.yaml",
        "pdb.yaml",
        "redis.yaml",
        "secret.example.yaml",
    }


@pytest.mark.parametrize("name", [p.name for p in _files()])
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    kv = _validator()
    for doc in _docs(name):
        where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{where}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:  # a kind or apiVersion Kubernetes does not have
            pytest.fail(f"{where}: {e.message}")


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above is only worth something if a wrong manifest fails it."""
    kv = _validator()
    good = _one("deployment.yaml", "Deployment")
    kv.validate(good, KUBERNETES_VERSION, strict=True)
    misspelled = copy.deepcopy(good)
    container = _container(misspelled)
    container["livenessprobe"] = container.pop("livenessProbe")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "three"
    misplaced = copy.deepcopy(good)
    misplaced["spec"]["template"]["spec"]["resources"] = {"limits": {"cpu": "1"}}
    for bad in (misspelled, wrong_type, misplaced):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate({**good, "kind": "Deploymnet"}, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_alternates() -> None:
    kustomization = _yaml().safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert all((KUBE_DIR / r).is_file() for r in listed), listed
    assert listed == {p.name for p in _files()} - ALTERNATES
    # the alternates stay out: both Deployments are one name (only one may run), and the example
    # Secret holds a placeholder
    assert not listed & ALTERNATES


# ---- the normserve Deployment -----------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_probes_call_the_grpc_health_service(name: str) -> None:
    container = _container(_one(name, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        # Kubernetes' native gRPC probe: grpc.health.v1 Check, service "" (the server's overall
        # health, which turns NOT_SERVING on SIGTERM), no token needed
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (probe, spec)
        assert spec["grpc"]["port"] == GRPC_PORT, probe
        assert spec["grpc"].get("service", "") == "", probe


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_gives_a_pod_time_to_drain(name: str) -> None:
    pod = _one(name, "Deployment")["spec"]["template"]["spec"]
    container = _container(_one(name, "Deployment"))
    grace = float(_flag(container, "--grace-seconds") or SERVER_GRACE_DEFAULT)
    pre_stop = container["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep = float(command[1])
    else:
        sleep = float(pre_stop["sleep"]["seconds"])
    # the pod leaves the endpoints while preStop sleeps; SIGTERM comes after it, then the drain:
    # Kubernetes' grace period counts both, and SIGKILL ends whatever is left
    assert sleep >= 3, "preStop should outlast the endpoints' propagation"
    assert pod["terminationGracePeriodSeconds"] > sleep + grace, (sleep, grace)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_shares_redis_and_runs_authenticated(name: str) -> None:
    deployment = _one(name, "Deployment")
    container = _container(deployment)
    assert deployment["spec"]["replicas"] == 3
    assert _flag(container, "--store") == STORE
    env = {item["name"]: item for item in container["env"]}
    assert "NORMSERVE_UNSAFE_EXPOSE_WITHOUT_AUTH" not in env
    tokens = env["NORMSERVE_AUTH_TOKENS"]
    assert "value" not in tokens, "a token never lives in a manifest"
    ref = tokens["valueFrom"]["secretKeyRef"]
    secret = _one("secret.example.yaml", "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_is_scraped_limited_and_unprivileged(name: str) -> None:
    template = _one(name, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    container = _container({"spec": {"template": template}})
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), resources
    assert {"cpu", "memory"} <= set(resources["limits"]), resources
    pod_security = template["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # with a read-only root, the image's working directory must be a volume
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_cpu_deployment_runs_the_image_compose_builds() -> None:
    assert _container(_one("deployment.yaml", "Deployment"))["image"] == _compose_image()


def test_gpu_deployment_is_the_same_deployment_on_a_gpu() -> None:
    cpu, gpu = _one("deployment.yaml", "Deployment"), _one("deployment-gpu.yaml", "Deployment")
    # one name and the same labels: it replaces the CPU one under the same Services and PDB
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"]
    assert gpu["spec"]["selector"] == cpu["spec"]["selector"]
    assert gpu["spec"]["template"]["metadata"] == cpu["spec"]["template"]["metadata"]
    container = _container(gpu)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert _flag(container, "--device") == "cuda"
    assert container["image"] != _container(cpu)["image"]  # the CUDA build of the image


# ---- Services and the PodDisruptionBudget -----------------------------------------------------


def test_services_and_pdb_select_the_deployment_pods() -> None:
    deployment = _one("deployment.yaml", "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    redis_labels = _one("redis.yaml", "StatefulSet")["spec"]["template"]["metadata"]["labels"]

    headless = _one("service.yaml", "Service", "normserve-headless")
    assert headless["spec"]["clusterIP"] == "None"  # DNS answers with every ready pod
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    cluster_ip = _one("service.yaml", "Service", "normserve")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert cluster_ip["spec"].get("clusterIP") != "None"
    named_ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}
    for service in (headless, cluster_ip):
        assert _selects(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        assert not _selects(service["spec"]["selector"], redis_labels)
        grpc = [p for p in service["spec"]["ports"] if p["port"] == GRPC_PORT]
        assert len(grpc) == 1 and named_ports.get(grpc[0]["targetPort"]) == GRPC_PORT

    pdb = _one("pdb.yaml", "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert not _selects(pdb["spec"]["selector"]["matchLabels"], redis_labels)
    # a budget that allows no eviction at all would block every node drain
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    else:
        assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# ---- Redis ------------------------------------------------------------------------------------


def _redis_args(container: Doc) -> dict[str, str]:
    args = [str(a) for a in container["args"]]
    assert args[0] == "redis-server", args
    options = args[1:]
    assert all(o.startswith("--") for o in options[::2]), options
    return dict(zip(options[::2], options[1::2], strict=True))


def test_redis_persists_to_a_volume_and_never_evicts() -> None:
    statefulset = _one("redis.yaml", "StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 1  # a single instance: one writer per AOF
    container = _container(statefulset)
    options = _redis_args(container)
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in {"everysec", "always"}
    # an evicting policy would delete sessions when memory runs short
    assert options["--maxmemory-policy"] == "noeviction"
    claims = {c["metadata"]["name"]: c for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[options["--dir"]] in claims, (mounts, list(claims))
    claim = claims[mounts[options["--dir"]]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_redis_service_is_where_normserve_looks() -> None:
    statefulset = _one("redis.yaml", "StatefulSet", "redis")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    service = _one("redis.yaml", "Service", "redis")
    host_port = STORE.removeprefix("redis://").partition("/")[0]
    assert host_port == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert _selects(service["spec"]["selector"], labels)
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    # only normserve's pods reach it (it has no password)
    policy = _one("redis.yaml", "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    deployment = _one("deployment.yaml", "Deployment")
    normserve_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sources = [
        f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]
    ]
    assert sources and all(_selects(s, normserve_labels) for s in sources)


def test_example_secret_holds_no_usable_token() -> None:
    """Applied as it is, the placeholder must stop the server rather than let a published token in:
    a line of tokens is exactly two fields, ``TENANT TOKEN``, the token 16-4096 characters."""
    value = _one("secret.example.yaml", "Secret")["stringData"]["NORMSERVE_AUTH_TOKENS"]
    for line in value.replace(";", "\n").splitlines():
        fields = line.split()
        assert len(fields) != 2 or len(fields[1]) < 16, f"usable token line: {line!r}"
