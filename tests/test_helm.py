"""The Helm chart (helm/qwen2-cluster): lint, render, validate, and check what it renders.

No Kubernetes cluster runs here, so the chart is checked the way a reviewer would check it, only
mechanically: `helm lint --strict` and `helm template` with the default values and each example values
file; every rendered built-in object validated against the Kubernetes JSON schemas (kubernetes-validate,
strict: unknown fields fail) for the oldest Kubernetes the chart supports and the newest schemas there are;
the custom resources (ServiceMonitor, PrometheusRule, RayCluster) checked by assertions, the RayCluster's
pod templates validated as Pods. Then the facts that matter for a real deployment: the GPUs requested are
exactly what the placement needs, the router's args parse with `qwen2-cluster serve`'s own parser (and
`ray start`'s with Ray's), the probes hit the ports the processes listen on, /dev/shm is a memory volume,
the NetworkPolicy keeps Ray's ports inside the release, the OpenAI-compatible HTTP API is exposed beside
gRPC (or cleanly off); and values the schema must refuse are refused.

helm is the real binary (.ci/install-helm.sh puts it in tools/bin; this module runs the script when it is
missing, so a plain `pytest` works on a fresh machine).
"""

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from router.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "qwen2-cluster"
EXAMPLES = ROOT / "helm" / "examples"
TEST_VALUES = Path(__file__).resolve().parent / "helm_values"
DASHBOARD_FILE = CHART / "files" / "grafana-dashboard.json"
RULES_FILE = CHART / "files" / "alert-rules.yaml"

RELEASE, NAMESPACE = "qwen", "inference"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate has.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "RayCluster"}

# name -> values files (relative to the repository root), applied in order over the chart's values.yaml.
SCENARIOS = {
    "default": [],
    "qwen2-72b-tp8-pp2": ["helm/examples/qwen2-72b-tp8-pp2.yaml"],
    "qwen2-0.5b-1gpu": ["helm/examples/qwen2-0.5b-1gpu.yaml"],
    "kuberay": ["helm/examples/kuberay.yaml"],
    "tls-auth": ["helm/examples/tls-auth.yaml"],
    "0.5b+tls-auth": ["helm/examples/qwen2-0.5b-1gpu.yaml", "helm/examples/tls-auth.yaml"],
    "mtls-kuberay": ["tests/helm_values/mtls.yaml"],
    "mtls-tcp-probes": ["tests/helm_values/mtls-tcp-probes.yaml"],
    "kitchen-sink": ["tests/helm_values/kitchen-sink.yaml"],
    "http-off": ["tests/helm_values/http-off.yaml"],
}


# -- helm ------------------------------------------------------------------------------------------------

def _find_helm() -> str | None:
    local = ROOT / "tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    found = _find_helm()
    if found is None:
        env = dict(os.environ, PYTHON=sys.executable)
        subprocess.run(["bash", str(ROOT / ".ci" / "install-helm.sh")], env=env, check=True, timeout=600)
        found = _find_helm()
    assert found, "no helm binary: run .ci/install-helm.sh"
    return found


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def value_args(files=(), sets=()) -> list[str]:
    out = []
    for f in files:
        out += ["-f", str(ROOT / f)]
    for s in sets:
        out += ["--set", s]
    return out


def template(helm: str, files=(), sets=()) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSIONS[0]]
    return run_helm(helm, *args, *value_args(files, sets))


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Rendered:
    """One scenario: its effective values and rendered objects."""

    def __init__(self, name: str, files: list[str], docs: list[dict]):
        self.name, self.files, self.docs = name, files, docs
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        for f in files:
            values = deep_merge(values, yaml.safe_load((ROOT / f).read_text()) or {})
        self.values = values

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{self.name}: expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    @property
    def fullname(self) -> str:
        """The chart's fullname helper, in Python."""
        if self.values.get("fullnameOverride"):
            return self.values["fullnameOverride"]
        name = self.values.get("nameOverride") or "qwen2-cluster"
        return RELEASE if name in RELEASE else f"{RELEASE}-{name}"

    def grpc_service(self) -> dict:
        (svc,) = [s for s in self.of_kind("Service") if s["metadata"]["name"] == self.fullname]
        return svc

    @property
    def kuberay(self) -> bool:
        return bool(self.values["kuberay"]["enabled"])

    @property
    def http_port(self) -> int | None:
        """The router's HTTP API port the values ask for (None: the API is off)."""
        http = self.values["serve"]["http"]
        return http["port"] if http["enabled"] else None

    @property
    def http_readiness(self) -> bool:
        """Whether readiness is GET /health on the HTTP port: the API on, and no mutual TLS (the kubelet has no
        client certificate to present)."""
        tls = self.values["tls"]
        return self.http_port is not None and not (tls["enabled"] and tls["clientCA"]["enabled"])

    # Pod templates by role: (pod spec, pod labels).
    def head_pod(self) -> tuple[dict, dict]:
        if self.kuberay:
            t = self.one("RayCluster")["spec"]["headGroupSpec"]["template"]
        else:
            t = self.one("Deployment", "-head")["spec"]["template"]
        return t["spec"], t["metadata"]["labels"]

    def worker_pod(self) -> tuple[dict, dict]:
        if self.kuberay:
            (group,) = self.one("RayCluster")["spec"]["workerGroupSpecs"]
            t = group["template"]
        else:
            t = self.one("StatefulSet", "-worker")["spec"]["template"]
        return t["spec"], t["metadata"]["labels"]

    def pods(self) -> list[tuple[dict, dict]]:
        return [self.head_pod(), self.worker_pod()]

    def router(self) -> dict:
        spec, _ = self.head_pod()
        (c,) = [c for c in spec["containers"] if c["name"] == "router"]
        return c

    def worker_replicas(self) -> int:
        if self.kuberay:
            (group,) = self.one("RayCluster")["spec"]["workerGroupSpecs"]
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
            return group["replicas"]
        return self.one("StatefulSet", "-worker")["spec"]["replicas"]


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, Rendered]:
    out = {}
    for name, files in SCENARIOS.items():
        r = template(helm, files)
        assert r.returncode == 0, f"helm template ({name}) failed:\n{r.stderr}"
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        out[name] = Rendered(name, files, docs)
    return out


scenario = pytest.mark.parametrize("name", list(SCENARIOS))


# -- lint and schema validation ----------------------------------------------------------------------------

@scenario
def test_helm_lint_strict(helm, name):
    r = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *value_args(SCENARIOS[name]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


def _validate(obj: dict, where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{where} does not validate against Kubernetes {version}: {path}: {e.message}")


@scenario
def test_every_object_validates_against_the_kubernetes_schemas(rendered, name):
    r = rendered[name]
    kinds = set()
    for doc in r.docs:
        kinds.add(doc["kind"])
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"].get("namespace") == NAMESPACE, where
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, where
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm", where
        if doc["kind"] in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate: checked by the assertions below
        _validate(doc, where)  # a built-in kind without a schema raises SchemaNotFoundError: a failure too
    if r.kuberay:
        # The RayCluster's pod templates are core PodTemplateSpecs: validate them as Pods.
        for role, (spec, labels) in zip(("head", "worker"), r.pods()):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role}", "labels": labels}, "spec": spec}
            _validate(pod, f"{name}: RayCluster {role} pod template")
        assert {"Deployment", "StatefulSet"}.isdisjoint(kinds), "KubeRay mode renders no head Deployment / worker StatefulSet"
    else:
        assert {"Deployment", "StatefulSet"} <= kinds
    assert {"Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_raycluster_shape(rendered):
    rc = rendered["kuberay"].one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] and spec["enableInTreeAutoscaling"] is False
    head = spec["headGroupSpec"]
    # KubeRay runs `ray start` in containers[0]: the Ray head, with the router as a sidecar.
    assert [c["name"] for c in head["template"]["spec"]["containers"]] == ["ray-head", "router"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["name"] == "ray-worker"
    for params in (head["rayStartParams"], group["rayStartParams"]):
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"


# -- the GPU layout ---------------------------------------------------------------------------------------------

EXPECTED_LAYOUT = {  # name -> (workers, GPUs per worker): the numbers the issue asks for, spelled out
    "default": (1, 1),
    "qwen2-72b-tp8-pp2": (2, 8),
    "qwen2-0.5b-1gpu": (1, 1),
    "kuberay": (2, 4),
}


def _gpus(container: dict, resource: str) -> tuple[int, int]:
    res = container.get("resources", {})
    return int(res.get("requests", {}).get(resource, 0)), int(res.get("limits", {}).get(resource, 0))


def _ray_start_args(r: Rendered, role: str) -> list[str]:
    """The `ray start` arguments of a role, as a list of --flag=value strings (KubeRay: its rayStartParams)."""
    if r.kuberay:
        rc = r.one("RayCluster")["spec"]
        params = rc["headGroupSpec"]["rayStartParams"] if role == "head" else rc["workerGroupSpecs"][0]["rayStartParams"]
        return [f"--{k}={v}" for k, v in params.items()] + (["--head"] if role == "head" else [])
    if role == "head":
        script = r.router()["command"][2]
        (line,) = [ln for ln in script.splitlines() if ln.startswith("ray ")]
        words = shlex.split(line)
        assert words[1] == "start"
        return words[2:]
    (c,) = r.worker_pod()[0]["containers"]
    assert c["command"] == ["ray"] and c["args"][0] == "start"
    return c["args"][1:]


def _flags(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            out[k] = v
    return out


@scenario
def test_gpu_requests_equal_what_the_placement_needs(rendered, name):
    r = rendered[name]
    v = r.values
    tp, pp, per_node = v["tensorParallelSize"], v["pipelineParallelSize"], v["gpusPerNode"]
    gpu = v["gpuResourceName"]
    workers = r.worker_replicas()
    # Worker count = TP x PP / gpusPerNode, exactly; every rank gets one GPU, no GPU idles.
    assert workers == tp * pp // per_node and workers * per_node == tp * pp
    if name in EXPECTED_LAYOUT:
        assert (workers, per_node) == EXPECTED_LAYOUT[name]
    # Each stage's TP group fits on one worker (STRICT_PACK), and workers hold whole stages.
    assert per_node % tp == 0

    spec, _ = r.worker_pod()
    (worker,) = [c for c in spec["containers"] if c["name"] == "ray-worker"]
    assert _gpus(worker, gpu) == (per_node, per_node)
    flags = _flags(_ray_start_args(r, "worker"))
    assert int(flags["num-gpus"]) == per_node, "Ray advertises exactly the GPUs the pod got"
    # Ray CPUs cover the ranks' bundles ({"GPU": 1, "CPU": cpusPerRank} each).
    assert int(flags["num-cpus"]) >= per_node * v["serve"]["cpusPerRank"]
    assert int(flags["num-cpus"]) == math.ceil(per_node * v["serve"]["cpusPerRank"])

    # The head holds no GPUs, and tells Ray so (no rank, no task lands there).
    head_spec, _ = r.head_pod()
    for c in head_spec["containers"]:
        assert _gpus(c, gpu) == (0, 0), c["name"]
    head_flags = _flags(_ray_start_args(r, "head"))
    assert head_flags["num-gpus"] == "0" and head_flags["num-cpus"] == "0"

    # And the router asks for exactly that placement.
    args = build_parser().parse_args(r.router()["args"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (tp, pp)
    assert args.device == "cuda"
    total = sum(_gpus(worker, gpu)[0] for _ in range(workers))
    assert total == args.tensor_parallel_size * args.pipeline_parallel_size


def test_the_72b_example_is_two_8_gpu_nodes(rendered):
    r = rendered["qwen2-72b-tp8-pp2"]
    args = build_parser().parse_args(r.router()["args"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (8, 2)
    assert args.dtype == "bfloat16"
    sts = r.one("StatefulSet", "-worker")
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    # One worker per node, required.
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"


@pytest.mark.parametrize("sets, message", [
    (["tensorParallelSize=8", "gpusPerNode=4"], "must sit on one node"),
    (["tensorParallelSize=3", "pipelineParallelSize=8", "gpusPerNode=8"], "not a multiple of tensorParallelSize"),
    (["tensorParallelSize=4", "pipelineParallelSize=3", "gpusPerNode=8"], "not a multiple of gpusPerNode"),
])
def test_layouts_that_would_strand_gpus_are_refused(helm, sets, message):
    r = template(helm, sets=sets)
    assert r.returncode != 0 and message in r.stderr, r.stderr


# -- the router's command line -----------------------------------------------------------------------------------

@scenario
def test_router_args_parse_with_the_cli_and_match_the_values(rendered, name):
    r = rendered[name]
    v, s = r.values, r.values["serve"]
    router = r.router()
    args = build_parser().parse_args(router["args"])  # SystemExit on any flag serve does not have
    assert args.command == "serve" and args.run.__name__ == "serve"
    model = v["model"]
    expected_model = model["mountPath"].rstrip("/") + ("/" + model["subdir"].strip("/") if model["subdir"] else "")
    assert args.model == expected_model
    assert args.host == "0.0.0.0"
    assert args.port == s["port"] and args.metrics_port == s["metricsPort"]
    assert args.http_port == (r.http_port or 0), "--http-port 0 turns the HTTP API off"
    assert args.served_model_name == (s["servedModelName"] or None)
    assert args.dtype == s["dtype"] and args.rope_scaling_mode == s["ropeScalingMode"]
    assert args.block_size == s["blockSize"]
    assert args.gpu_memory_utilization == pytest.approx(s["gpuMemoryUtilization"])
    assert args.cpus_per_rank == pytest.approx(s["cpusPerRank"])
    assert args.placement_timeout == s["placementTimeoutSeconds"]
    assert args.step_timeout == s["stepTimeoutSeconds"]
    assert args.max_model_len == s["maxModelLen"]
    assert args.max_num_seqs == s["maxNumSeqs"] and args.max_num_batched_tokens == s["maxNumBatchedTokens"]
    assert args.max_new_tokens_limit == s["maxNewTokensLimit"]
    assert args.max_message_bytes == s["maxMessageBytes"]
    assert args.max_concurrent_rpcs == s["maxConcurrentRpcs"]
    assert args.drain_timeout == s["drainTimeoutSeconds"]
    if "--max-waiting" not in s["extraArgs"]:
        assert args.max_waiting == s["maxWaiting"]
    # The router joins the Ray head of its own pod (Kubernetes expands $(POD_IP) from the env).
    assert args.ray_address == f"$(POD_IP):{v['ray']['ports']['gcs']}"
    env = {e["name"]: e for e in router["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # Plain mode: one container starts the Ray head, then execs the router with these args.
    if not r.kuberay:
        cmd = router["command"]
        assert cmd[:2] == ["/bin/bash", "-c"] and cmd[3] == "qwen2-cluster"
        assert cmd[2].rstrip().endswith('exec qwen2-cluster "$@"')
    # Grace period covers the drain.
    head_spec, _ = r.head_pod()
    assert head_spec["terminationGracePeriodSeconds"] >= s["drainTimeoutSeconds"]


def _mounts(container: dict, spec: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["volumeName"] if "volumeName" in m else m["name"]])
            for m in container.get("volumeMounts", [])}


def _file_source(path: str, container: dict, spec: dict) -> tuple[dict, str]:
    """The volume a file path in the container comes from, and the file's name inside it."""
    mounts = _mounts(container, spec)
    for mount_path, (m, vol) in mounts.items():
        if path.startswith(mount_path.rstrip("/") + "/"):
            assert m.get("readOnly") is True, f"{mount_path} is mounted read-only"
            return vol, path[len(mount_path.rstrip("/")) + 1:]
    pytest.fail(f"{path} is on no volume of {container['name']}")


@scenario
def test_tls_and_auth_flags_point_at_the_mounted_secrets(rendered, name):
    r = rendered[name]
    v = r.values
    spec, _ = r.head_pod()
    router = r.router()
    args = build_parser().parse_args(router["args"])
    if v["tls"]["enabled"]:
        vol, key = _file_source(args.tls_cert_file, router, spec)
        assert vol["secret"]["secretName"] == v["tls"]["secretName"] and key == "tls.crt"
        vol, key = _file_source(args.tls_key_file, router, spec)
        assert vol["secret"]["secretName"] == v["tls"]["secretName"] and key == "tls.key"
        if v["tls"]["clientCA"]["enabled"]:
            vol, key = _file_source(args.tls_client_ca_file, router, spec)
            assert vol["secret"]["secretName"] == (v["tls"]["clientCA"]["secretName"] or v["tls"]["secretName"])
            assert key == v["tls"]["clientCA"]["key"]
        else:
            assert args.tls_client_ca_file is None
    else:
        assert args.tls_cert_file is None and args.tls_key_file is None and args.tls_client_ca_file is None
    if v["auth"]["enabled"]:
        vol, key = _file_source(args.auth_token_file, router, spec)
        secret = v["auth"]["existingSecret"] or f"{r.fullname}-auth"
        assert vol["secret"]["secretName"] == secret and key == v["auth"]["secretKey"]
        if not v["auth"]["existingSecret"]:
            (sec,) = [d for d in r.of_kind("Secret") if d["metadata"]["name"] == secret]
            assert v["auth"]["secretKey"] in sec["data"]
    else:
        assert args.auth_token_file is None
    assert "QWEN2_AUTH_TOKEN" not in {e["name"] for e in router["env"]}


@scenario
def test_ray_start_args_parse_with_rays_cli(rendered, name):
    from ray.scripts.scripts import start

    r = rendered[name]
    ports = r.values["ray"]["ports"]
    for role in ("head", "worker"):
        args = _ray_start_args(r, role)
        start.make_context("start", list(args))  # click refuses unknown or malformed flags
        flags = _flags(args)
        assert int(flags["node-manager-port"]) == ports["nodeManager"]
        assert int(flags["object-manager-port"]) == ports["objectManager"]
        assert int(flags["dashboard-agent-listen-port"]) == ports["dashboardAgentListen"]
        assert (int(flags["min-worker-port"]), int(flags["max-worker-port"])) == (ports["minWorker"], ports["maxWorker"])
    if not r.kuberay:
        head = _flags(_ray_start_args(r, "head"))
        assert int(head["port"]) == ports["gcs"] and head["node-ip-address"] == "$(POD_IP)"
        worker_args = _ray_start_args(r, "worker")
        assert worker_args[-1] == "--block"
        host = f"{r.fullname}-ray-head"
        assert _flags(worker_args)["address"] == f"{host}.{NAMESPACE}.svc.{r.values['clusterDomain']}:{ports['gcs']}"
        ray_head = r.one("Service", "-ray-head")
        assert ray_head["metadata"]["name"] == host
        assert ports["gcs"] in [p["port"] for p in ray_head["spec"]["ports"]]


@scenario
def test_ray_token_auth_reaches_every_ray_process(rendered, name):
    r = rendered[name]
    auth = r.values["ray"]["auth"]
    for spec, _ in r.pods():
        for c in spec["containers"] + spec.get("initContainers", []):
            if c["name"] == "wait-for-ray-head":
                continue  # a TCP check only
            env = {e["name"]: e for e in c.get("env", [])}
            if not auth["enabled"]:
                assert "RAY_AUTH_TOKEN" not in env
                continue
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == auth["secretKey"]
            if auth["existingSecret"]:
                assert ref["name"] == auth["existingSecret"]
            else:
                (sec,) = [d for d in r.of_kind("Secret") if d["metadata"]["name"] == ref["name"]]
                assert auth["secretKey"] in sec["data"]


# -- probes -------------------------------------------------------------------------------------------------------

def _container_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p for p in container["ports"] if p["name"] == port]
    return p["containerPort"]


@scenario
def test_probe_ports_are_the_ports_the_processes_listen_on(rendered, name):
    from qwen2_client.cli import build_parser as client_parser

    r = rendered[name]
    v = r.values
    router = r.router()
    args = build_parser().parse_args(router["args"])
    assert _container_port(router, "grpc") == args.port
    assert _container_port(router, "metrics") == args.metrics_port
    if args.http_port:
        assert _container_port(router, "http") == args.http_port
    else:
        assert "http" not in [p["name"] for p in router["ports"]]
    # Startup and liveness: the gRPC check. Readiness: GET /health on the HTTP API where it can be probed.
    probes = [router[k] for k in ("startupProbe", "livenessProbe")]
    if r.http_readiness:
        get = router["readinessProbe"]["httpGet"]
        assert get["path"] == "/health" and _container_port(router, get["port"]) == args.http_port
        assert get["scheme"] == ("HTTPS" if v["tls"]["enabled"] else "HTTP")
        assert "httpHeaders" not in get, "/health needs no token"
    else:
        probes.append(router["readinessProbe"])
    for probe in probes:
        if not v["tls"]["enabled"]:
            # Kubernetes' own gRPC probe: grpc.health.v1 Check on the server's port.
            assert probe["grpc"]["port"] == args.port and "service" not in probe["grpc"]
        elif v["tls"]["clientCA"]["enabled"] and not v["tls"]["clientCA"]["probeClientSecret"]:
            assert probe["tcpSocket"]["port"] == args.port
        else:
            # kubelet's gRPC probe speaks no TLS: the SDK's health command over TLS to the local port.
            cmd = probe["exec"]["command"]
            assert cmd[0] == "qwen2-client"
            cli = client_parser().parse_args(cmd[1:])
            assert cli.command == "health" and cli.target == f"127.0.0.1:{args.port}"
            spec, _ = r.head_pod()
            vol, key = _file_source(cli.ca, router, spec)
            assert vol["secret"]["secretName"] == v["tls"]["secretName"] and key == v["tls"]["caKey"]
            assert cli.server_name == (v["tls"]["serverName"] or f"{r.fullname}.{NAMESPACE}.svc.{v['clusterDomain']}")
            if v["tls"]["clientCA"]["enabled"]:
                vol, _ = _file_source(cli.cert, router, spec)
                assert vol["secret"]["secretName"] == v["tls"]["clientCA"]["probeClientSecret"]
            assert probe["timeoutSeconds"] >= 5
    # The startup window covers the wait for the workers' GPUs plus the weights' load.
    startup = router["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    assert window >= args.placement_timeout + v["head"]["startupProbe"]["loadSeconds"]
    # Services target the same ports.
    svc_ports = {p["name"]: p for p in r.grpc_service()["spec"]["ports"]}
    assert set(svc_ports) == ({"grpc", "http"} if args.http_port else {"grpc"})
    grpc_port = svc_ports["grpc"]
    assert _container_port(router, grpc_port["targetPort"]) == args.port and grpc_port["appProtocol"] == "grpc"
    if args.http_port:
        http_port = svc_ports["http"]
        assert _container_port(router, http_port["targetPort"]) == args.http_port
        assert http_port["port"] == v["service"]["httpPort"]
        assert http_port["appProtocol"] == ("https" if v["tls"]["enabled"] else "http")
    metrics = r.one("Service", "-metrics")
    (mport,) = metrics["spec"]["ports"]
    assert _container_port(router, mport["targetPort"]) == args.metrics_port

    # Ray containers: liveness/readiness on the raylet through the node's agent, on the port `ray start` gives it.
    agent_port = int(_flags(_ray_start_args(r, "worker"))["dashboard-agent-listen-port"])
    ray_containers = [c for spec, _ in r.pods() for c in spec["containers"] if c["name"].startswith("ray-")]
    assert ray_containers
    for c in ray_containers:
        for k in ("livenessProbe", "readinessProbe"):
            get = c[k]["httpGet"]
            assert get["path"] == "/api/local_raylet_healthz" and get["port"] == agent_port, c["name"]


# -- volumes ----------------------------------------------------------------------------------------------------

@scenario
def test_dev_shm_is_a_memory_volume_on_every_ray_container(rendered, name):
    r = rendered[name]
    sizes = {"head": r.values["head"]["shmSize"], "worker": r.values["worker"]["shmSize"]}
    for role, (spec, _) in zip(("head", "worker"), r.pods()):
        for c in spec["containers"]:
            m, vol = _mounts(c, spec)["/dev/shm"]
            assert vol["emptyDir"]["medium"] == "Memory", (role, c["name"])
            assert vol["emptyDir"]["sizeLimit"] == sizes[role]
            # The root filesystem is read-only: Ray's session dir and HOME live on /tmp.
            assert "/tmp" in _mounts(c, spec)
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


@scenario
def test_model_weights_are_mounted_read_only_from_the_chosen_source(rendered, name):
    r = rendered[name]
    model = r.values["model"]
    router_args = build_parser().parse_args(r.router()["args"])
    for role, (spec, _) in zip(("head", "worker"), r.pods()):
        containers = [c for c in spec["containers"] if c["name"] in ("router", "ray-worker")]
        assert containers
        for c in containers:
            m, vol = _mounts(c, spec)[model["mountPath"]]
            assert m["readOnly"] is True
            assert router_args.model.startswith(model["mountPath"])
            if model["source"] == "hostPath":
                assert vol["hostPath"] == {"path": model["hostPath"], "type": "Directory"}
            else:
                claim = vol["persistentVolumeClaim"]
                assert claim["readOnly"] is True
                if model["source"] == "existingClaim":
                    assert claim["claimName"] == model["existingClaim"]
                else:
                    pvc = r.one("PersistentVolumeClaim")
                    assert claim["claimName"] == pvc["metadata"]["name"]
                    assert pvc["spec"]["resources"]["requests"]["storage"] == model["pvc"]["size"]
    assert bool(r.of_kind("PersistentVolumeClaim")) == (model["source"] == "pvc")


@scenario
def test_nccl_and_other_env_come_from_values_on_every_ray_container(rendered, name):
    r = rendered[name]
    for spec, _ in r.pods():
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            for k, val in r.values["env"].items():
                assert env[k] == str(val), (c["name"], k)
            for e in r.values["extraEnv"]:
                assert e["name"] in env
            assert env["RAY_USAGE_STATS_ENABLED"] == "0"


# -- network policy, services, security ---------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get("matchExpressions")


@scenario
def test_network_policy_keeps_rays_ports_between_the_releases_own_pods(rendered, name):
    r = rendered[name]
    (policy,) = r.of_kind("NetworkPolicy")
    spec = policy["spec"]
    pods = r.pods()
    # It governs every pod of the release.
    for _, labels in pods:
        assert _selects(spec["podSelector"], labels)
    router_args = build_parser().parse_args(r.router()["args"])
    public = {router_args.port, router_args.metrics_port} | ({router_args.http_port} if router_args.http_port else set())

    # Ray's ports: GCS, client server, dashboard, and what every node binds (from the real `ray start` flags).
    ports = r.values["ray"]["ports"]
    ray_ports = {ports["gcs"], ports["client"], ports["dashboard"]}
    for role in ("head", "worker"):
        f = _flags(_ray_start_args(r, role))
        ray_ports |= {int(f[k]) for k in ("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                                         "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                                         "metrics-export-port", "min-worker-port", "max-worker-port")}
    assert not ray_ports & public

    def admits(rule: dict, port: int) -> bool:
        if not rule.get("ports"):
            return True
        return any(p.get("port") == port or (isinstance(p.get("port"), int) and p.get("endPort", -1) >= port >= p["port"])
                   for p in rule["ports"])

    def only_release_pods(rule: dict) -> bool:
        peers = rule.get("from")
        return bool(peers) and all(set(p) == {"podSelector"} and all(_selects(p["podSelector"], labels) for _, labels in pods)
                                   for p in peers)

    ingress = spec["ingress"]
    # Every Ray port (and the worker port range, NCCL, gloo, the rendezvous port) is open between the release's pods...
    internal = [rule for rule in ingress if only_release_pods(rule) and not rule.get("ports")]
    assert internal, "an all-ports rule from the release's own pods"
    for rule in internal:
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"] == spec["podSelector"]["matchLabels"]
    # ...and no other rule admits any of them from anywhere else (extraIngress excepted: the operator's own choice).
    extra = r.values["networkPolicy"]["extraIngress"]
    for rule in ingress:
        if only_release_pods(rule) or rule in extra:
            continue
        assert rule.get("ports"), f"{name}: an open rule {rule}"
        for port in ray_ports | set(range(ports["minWorker"], ports["maxWorker"] + 1, 997)):
            assert not admits(rule, port), f"{name}: port {port} is reachable from outside the release: {rule}"
        assert {p["port"] for p in rule["ports"]} <= public
    # The API and metrics ports are reachable (from the configured peers).
    for port in public:
        assert any(admits(rule, port) for rule in ingress if not only_release_pods(rule))
    # HTTP from exactly where gRPC is allowed; with it off, nothing admits its port from outside.
    grpc_rules = [rule for rule in ingress if not only_release_pods(rule) and rule not in extra
                  and admits(rule, router_args.port)]
    assert grpc_rules
    for rule in grpc_rules:
        assert rule.get("from") == (r.values["networkPolicy"]["grpcFrom"] or None)
        if router_args.http_port:
            assert admits(rule, router_args.http_port)
    if not router_args.http_port:
        assert not any(admits(rule, r.values["serve"]["http"]["port"]) for rule in ingress
                       if not only_release_pods(rule) and rule not in extra)
    if r.values["networkPolicy"]["restrictEgress"]:
        assert "Egress" in spec["policyTypes"]
        egress = spec["egress"]
        assert any(only_release_pods({"from": e["to"]}) for e in egress if e.get("to"))
        dns = [e for e in egress if not e.get("to")]
        assert dns and all({p["port"] for p in e["ports"]} == {53} for e in dns)


@scenario
def test_services(rendered, name):
    r = rendered[name]
    v = r.values
    head_labels = r.head_pod()[1]
    for svc in r.of_kind("Service"):
        assert svc["spec"].get("type", "ClusterIP") in ("ClusterIP", "NodePort", "LoadBalancer")
    (grpc,) = [s for s in r.of_kind("Service") if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert grpc is r.grpc_service()
    assert grpc["spec"]["type"] == v["service"]["type"]
    assert _selects({"matchLabels": grpc["spec"]["selector"]}, head_labels)
    if v["service"]["type"] == "LoadBalancer":
        assert grpc["spec"].get("loadBalancerSourceRanges") == (v["service"]["loadBalancerSourceRanges"] or None)
    metrics = r.one("Service", "-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert _selects({"matchLabels": metrics["spec"]["selector"]}, head_labels)
    # The Ray head is internal only: headless, reachable before the router is ready (workers join first).
    if not r.kuberay:
        ray_head = r.one("Service", "-ray-head")
        assert ray_head["spec"]["type"] == "ClusterIP" and ray_head["spec"]["clusterIP"] == "None"
        assert ray_head["spec"]["publishNotReadyAddresses"] is True
        sts = r.one("StatefulSet", "-worker")
        assert sts["spec"]["serviceName"] == r.one("Service", "-worker")["metadata"]["name"]
    # No Ray port on a Service that can leave the cluster.
    for svc in r.of_kind("Service"):
        if svc["spec"]["type"] != "ClusterIP":
            assert [p["name"] for p in svc["spec"]["ports"]] == (["grpc", "http"] if r.http_port else ["grpc"])


@scenario
def test_hardened_security_context(rendered, name):
    r = rendered[name]
    for sa in r.of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    for spec, _ in r.pods():
        assert spec["automountServiceAccountToken"] is False
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert sc.get("privileged") is not True and sc["readOnlyRootFilesystem"] is True
            assert c["resources"], c["name"]


@scenario
def test_pod_disruption_budget_covers_every_pod(rendered, name):
    r = rendered[name]
    (pdb,) = r.of_kind("PodDisruptionBudget")
    for _, labels in r.pods():
        assert _selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["maxUnavailable"] == r.values["podDisruptionBudget"]["maxUnavailable"]


@scenario
def test_scheduling_fields_reach_the_pods(rendered, name):
    r = rendered[name]
    for role, (spec, _) in zip(("head", "worker"), r.pods()):
        values = r.values[role]
        for key in ("nodeSelector", "tolerations", "topologySpreadConstraints", "priorityClassName", "runtimeClassName"):
            assert spec.get(key) == (values[key] or None), (role, key)
        for k, v in (values["affinity"] or {}).items():
            if k != "podAntiAffinity" or values.get("podAntiAffinity", "none") == "none":
                assert spec["affinity"][k] == v


# -- observability ------------------------------------------------------------------------------------------------

@scenario
def test_dashboard_rules_and_service_monitor(rendered, name):
    r = rendered[name]
    m = r.values["metrics"]
    dashboards = [d for d in r.of_kind("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    if m["grafanaDashboard"]["enabled"] and DASHBOARD_FILE.is_file():
        (cm,) = dashboards
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = cm["data"].values()
        assert content == DASHBOARD_FILE.read_text().rstrip("\n")
    elif not m["grafanaDashboard"]["enabled"]:
        assert not dashboards

    rules = r.of_kind("PrometheusRule")
    if m["prometheusRule"]["enabled"] and RULES_FILE.is_file():
        (rule,) = rules
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
        for k, val in m["prometheusRule"]["labels"].items():
            assert rule["metadata"]["labels"][k] == val
    elif not m["prometheusRule"]["enabled"]:
        assert not rules

    monitors = r.of_kind("ServiceMonitor")
    if m["serviceMonitor"]["enabled"]:
        (sm,) = monitors
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        metrics = r.one("Service", "-metrics")
        assert _selects(sm["spec"]["selector"], metrics["metadata"]["labels"])
        # It must not also pick the gRPC Service.
        grpc = [s for s in r.of_kind("Service") if s is not metrics and _selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert not grpc
        (ep,) = sm["spec"]["endpoints"]
        assert ep["port"] in [p["name"] for p in metrics["spec"]["ports"]] and ep["path"] == "/metrics"
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    else:
        assert not monitors


def test_observability_switches_off(helm):
    r = template(helm, sets=["metrics.grafanaDashboard.enabled=false", "metrics.serviceMonitor.enabled=false",
                             "metrics.prometheusRule.enabled=false"])
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds and "ConfigMap" not in kinds


# -- the OpenAI-compatible HTTP API --------------------------------------------------------------------------------

def test_http_api_is_on_by_default_beside_grpc(rendered):
    r = rendered["default"]
    router = r.router()
    args = build_parser().parse_args(router["args"])
    assert args.http_port == 8000 and args.host == "0.0.0.0" and args.served_model_name is None
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in router["ports"]
    http = [p for p in r.grpc_service()["spec"]["ports"] if p["name"] == "http"]
    assert http == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}]
    (policy,) = r.of_kind("NetworkPolicy")
    (api,) = [rule for rule in policy["spec"]["ingress"] if {"port": 50051, "protocol": "TCP"} in rule.get("ports", [])]
    assert {"port": 8000, "protocol": "TCP"} in api["ports"] and "from" not in api  # grpcFrom [] = any source
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}
    # Startup and liveness keep the gRPC health check (and its long liveness window).
    assert router["startupProbe"]["grpc"] == router["livenessProbe"]["grpc"] == {"port": 50051}


@pytest.mark.parametrize("name, scheme", [("0.5b+tls-auth", "HTTPS"), ("mtls-kuberay", None), ("mtls-tcp-probes", None)])
def test_http_readiness_follows_tls(rendered, name, scheme):
    r = rendered[name]
    router = r.router()
    args = build_parser().parse_args(router["args"])
    assert args.tls_cert_file and args.http_port == 8000, "one TLS setting for gRPC and HTTP"
    ready = router["readinessProbe"]
    if scheme:
        assert ready["httpGet"] == {"path": "/health", "port": 8000, "scheme": scheme}
        (http,) = [p for p in r.grpc_service()["spec"]["ports"] if p["name"] == "http"]
        assert http["appProtocol"] == "https"
    else:
        # Mutual TLS: the kubelet has no client certificate, so readiness is the gRPC check, like liveness.
        assert "httpGet" not in ready
        assert {k: v for k, v in ready.items() if k in ("exec", "tcpSocket")} == \
            {k: v for k, v in router["livenessProbe"].items() if k in ("exec", "tcpSocket")}


def test_http_api_off(rendered):
    r = rendered["http-off"]
    router = r.router()
    words = router["args"]
    assert words[words.index("--http-port") + 1] == "0"
    args = build_parser().parse_args(words)
    assert args.http_port == 0 and args.served_model_name == "qwen2-custom"
    assert "http" not in [p["name"] for p in router["ports"]]
    for svc in r.of_kind("Service"):
        assert "http" not in [p["name"] for p in svc["spec"]["ports"]], svc["metadata"]["name"]
    (policy,) = r.of_kind("NetworkPolicy")
    assert not [p for rule in policy["spec"]["ingress"] for p in rule.get("ports", []) if p["port"] == 8000]
    # Readiness falls back to the gRPC check (here qwen2-client health over TLS).
    assert router["readinessProbe"]["exec"] == router["livenessProbe"]["exec"]


def test_http_api_custom_ports_and_model_name(rendered):
    r = rendered["kitchen-sink"]
    router = r.router()
    args = build_parser().parse_args(router["args"])
    assert args.http_port == 8443 and args.served_model_name == "qwen2-7b-chat"
    assert _container_port(router, "http") == 8443
    (http,) = [p for p in r.grpc_service()["spec"]["ports"] if p["name"] == "http"]
    assert (http["port"], _container_port(router, http["targetPort"])) == (443, 8443)
    assert r.grpc_service()["spec"]["type"] == "NodePort"
    assert router["readinessProbe"]["httpGet"]["port"] == 8443
    (policy,) = r.of_kind("NetworkPolicy")
    (api,) = [rule for rule in policy["spec"]["ingress"] if {"port": args.port, "protocol": "TCP"} in rule.get("ports", [])]
    assert {"port": 8443, "protocol": "TCP"} in api["ports"] and api["from"] == r.values["networkPolicy"]["grpcFrom"]


@pytest.mark.parametrize("sets, message", [
    (["serve.http.port=50051"], "serve.http.port=50051 is also serve.port"),
    (["serve.http.port=9090"], "is also serve.metricsPort"),
    (["serve.http.port=6379"], "is also ray.ports.gcs"),
    (["serve.http.port=12000"], "Ray's worker port range"),
])
def test_http_port_clashes_are_refused(helm, sets, message):
    r = template(helm, sets=sets)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    # Off, the port is not used: no clash.
    assert template(helm, sets=sets + ["serve.http.enabled=false"]).returncode == 0


# -- values the schema refuses ------------------------------------------------------------------------------------

REJECTED = [
    (["tensorParallelSize=0"], "tensorParallelSize"),
    (["tensorParallelSize=-8"], "tensorParallelSize"),
    (["pipelineParallelSize=0"], "pipelineParallelSize"),
    (["gpusPerNode=0"], "gpusPerNode"),
    (["tensorParallelSize=2.5"], "tensorParallelSize"),
    (["serve.dtype=int8"], "dtype"),
    (["serve.dtype=fp8"], "dtype"),
    (["model.source=null"], "source"),
    (["model.source=s3"], "source"),
    (["model.source=existingClaim"], "existingClaim"),
    (["model.source=hostPath"], "hostPath"),
    (["model.source=hostPath", "model.hostPath=relative/dir"], "hostPath"),
    (["serve.port=0"], "port"),
    (["serve.port=70000"], "port"),
    (["serve.ropeScalingMode=yarn"], "ropeScalingMode"),
    (["serve.gpuMemoryUtilization=1.5"], "gpuMemoryUtilization"),
    (["service.type=Ingress"], "type"),
    (["tls.enabled=true"], "secretName"),
    (["worker.podAntiAffinity=maybe"], "podAntiAffinity"),
    (["tensorParalelSize=8"], "tensorParalelSize"),  # a typo is not silently ignored
    (["serve.maxNumSeq=8"], "maxNumSeq"),
    (["image.repository="], "repository"),
    (["serve.http.port=0"], "/serve/http/port"),
    (["serve.http.port=abc"], "/serve/http/port"),
    (["serve.http.enabled=maybe"], "/serve/http/enabled"),
    (["serve.http.prot=8000"], "prot"),
    (["service.httpPort=0"], "/service/httpPort"),
    (["serve.servedModelName=my model"], "servedModelName"),
]


@pytest.mark.parametrize("sets, field", REJECTED, ids=[" ".join(s) for s, _ in REJECTED])
def test_schema_rejects_nonsense(helm, sets, field):
    r = template(helm, sets=sets)
    assert r.returncode != 0, f"helm template accepted {sets}"
    assert "don't meet the specifications of the schema" in r.stderr and field in r.stderr, r.stderr
    lint = run_helm(helm, "lint", "--strict", str(CHART), *value_args(sets=sets))
    assert lint.returncode != 0, f"helm lint accepted {sets}"


# -- NOTES, Chart, image ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "0.5b+tls-auth", "kuberay", "http-off"])
def test_notes_say_how_to_reach_the_service(helm, rendered, name):
    r = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 *value_args(SCENARIOS[name]))
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    svc = rendered[name].grpc_service()
    port = svc["spec"]["ports"][0]["port"]
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}" in notes
    calls = [ln.strip() for ln in notes.splitlines() if ln.strip().startswith("qwen2-client ")]
    assert calls
    from qwen2_client.cli import build_parser as client_parser

    for call in calls:
        words = [w.replace('"$TARGET"', "127.0.0.1:1").replace("$TARGET", "127.0.0.1:1") for w in shlex.split(call)]
        args = client_parser().parse_args(words[1:])
        assert args.target
    if rendered[name].values["tls"]["enabled"]:
        assert "--ca" in notes
    if rendered[name].values["auth"]["enabled"]:
        assert "--token" in notes
    if rendered[name].values["service"]["type"] == "ClusterIP":
        assert f"port-forward svc/{svc['metadata']['name']} {port}:{port}" in notes
    _check_http_notes(rendered[name], notes)


def _check_http_notes(r: Rendered, notes: str) -> None:
    """The NOTES' HTTP API part: the in-cluster base URL, and curl calls with the TLS and token settings."""
    v = r.values
    svc = r.grpc_service()
    if r.http_port is None:
        assert "HTTP API is off" in notes and "curl" not in notes
        return
    (http,) = [p for p in svc["spec"]["ports"] if p["name"] == "http"]
    scheme = "https" if v["tls"]["enabled"] else "http"
    host = f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert f"{scheme}://{host}:{http['port']}/v1" in notes
    model = v["serve"]["servedModelName"] or Path(build_parser().parse_args(r.router()["args"]).model).name
    assert f'(model "{model}"' in notes
    if v["service"]["type"] == "ClusterIP":
        assert f"port-forward svc/{svc['metadata']['name']} {http['port']}:{http['port']}" in notes
    lines = notes.replace("\\\n", " ").splitlines()
    calls = [shlex.split(ln.strip()) for ln in lines if ln.strip().startswith("curl ")]
    assert len(calls) == 2
    for words in calls:
        url = [w for w in words if w.startswith(("http://", "https://"))][-1]
        assert url.startswith(f"{scheme}://") and "/v1/" in url
        if v["tls"]["enabled"]:
            name = v["tls"]["serverName"] or host
            assert words[words.index("--cacert") + 1] == "ca.crt"
            assert words[words.index("--connect-to") + 1] == f"{name}:{http['port']}:$HTTP_TARGET"
            assert url.startswith(f"https://{name}:{http['port']}/v1/")
        else:
            assert url.startswith("http://$HTTP_TARGET/v1/")
        assert ("--cert" in words) == bool(v["tls"]["enabled"] and v["tls"]["clientCA"]["enabled"])
        assert ("Authorization: Bearer $QWEN2_TOKEN" in words) == bool(v["auth"]["enabled"])
    (chat,) = [w for words in calls for w in words if w.startswith("{")]
    assert json.loads(chat)["model"] == model


def test_install_helm_script_is_idempotent(helm):
    if not (ROOT / "tools" / "bin" / "helm").is_file():
        pytest.skip("helm came from PATH, not from .ci/install-helm.sh")
    r = subprocess.run(["bash", str(ROOT / ".ci" / "install-helm.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "already installed" in r.stdout, r.stdout + r.stderr
    assert run_helm(helm, "version", "--short").stdout.startswith("v")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_chart_app_version_is_the_projects_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "qwen2-cluster"
    assert chart["appVersion"] == _pyproject()["project"]["version"]
    assert chart["kubeVersion"].startswith(">=1.30")


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "helm" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_and_runs_this_project():
    from packaging.requirements import Requirement
    from packaging.version import Version

    ins = _dockerfile()
    project = _pyproject()
    deps = {Requirement(d).name: Requirement(d) for d in project["project"]["dependencies"]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    (base,) = [rest for op, rest in ins if op == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and "cuda" in tag, "a CUDA PyTorch base"
    assert Version(tag.split("-")[0]) in deps["torch"].specifier, "the base's torch satisfies pyproject (pip keeps it)"

    copied = {w.rstrip("/") for op, rest in ins if op == "COPY" for w in rest.split()[:-1]}
    packages = set(project["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {p.rstrip("*") for p in packages} <= copied, "every package pyproject installs is copied"
    assert {"client", "pyproject.toml", project["project"]["readme"]} <= copied

    (install,) = [rest for op, rest in ins if op == "RUN" and "pip install" in rest]
    words = shlex.split(install.split("&&")[0])
    assert words[:2] == ["pip", "install"]
    assert "./client" in words and "." in words, "the SDK and the server, from this checkout"
    (ray_req,) = [Requirement(w) for w in words if w.startswith("ray[")]
    assert "default" in ray_req.extras, "the dashboard agent (the raylet health endpoint the chart probes)"
    assert ray_req.specifier == deps["ray"].specifier, "the same Ray range as pyproject"

    users = [rest for op, rest in ins if op == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid == str(values["podSecurityContext"]["runAsUser"]) and uid != "0"
    assert gid == str(values["podSecurityContext"]["runAsGroup"])

    (entry,) = [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"]
    assert entry == ["qwen2-cluster"] and "qwen2-cluster" in project["project"]["scripts"]
    (cmd,) = [json.loads(rest) for op, rest in ins if op == "CMD"]
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0"
    exposed = {int(p) for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert {args.port, args.metrics_port, args.http_port} <= exposed
    assert {values["serve"]["port"], values["serve"]["metricsPort"], values["serve"]["http"]["port"],
            values["ray"]["ports"]["gcs"],
            values["ray"]["ports"]["dashboardAgentListen"]} <= exposed
    assert values["image"]["repository"] == "qwen2-cluster"
