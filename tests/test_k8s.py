"""deploy/k8s agrees with the Kubernetes API and with the code.

Every manifest is validated offline against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields fail), for the oldest and newest versions we claim.
Then the manifests are held against the real CLI parsers, the server image and each other: flags,
ports, probes, Secrets and their mount paths, the volume holding the checkpoint, labels and
selectors, drain timing, the HPA's metrics and the adapter rules that produce them.
"""

from __future__ import annotations

import functools
import re
import socket
from pathlib import Path

import pytest
import yaml
from test_docker import DOCKERFILES, compose, deploy_text, grpc_port, parse_cli, parse_dockerfile

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The preStop sleep action is GA in 1.34, on by default since 1.30 (beta).
VERSIONS = ("1.30.0", "1.37.0")
NOT_API_OBJECTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_API_OBJECTS)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in manifest_files():
        for d in docs(path):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def deployment() -> dict:
    return objects()[("Deployment", "hnd-server")]


def server_container() -> dict:
    (c,) = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def server_args():
    return parse_cli("hnd-server", server_container()["args"], "server-deployment.yaml args")


@pytest.fixture(scope="module", autouse=True)
def cached_schemas():
    """Read each bundled schema file once (kubernetes-validate parses the multi-MB definitions per call)."""
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    utils.schema_contents = original


@pytest.fixture
def no_network(monkeypatch):
    """Validation must work offline: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_against_the_kubernetes_schema(path, version, no_network):
    import kubernetes_validate

    for d in docs(path):
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{path.relative_to(ROOT)} {d['kind']}/{d['metadata']['name']} (Kubernetes {version}): "
                f"{exc.message} at {'.'.join(map(str, exc.path))}"
            )


def test_validation_catches_what_it_should(no_network):
    """The schemas are really applied: a misspelt field and a wrong type are refused."""
    import kubernetes_validate

    bad = yaml.safe_load((K8S / "server-pdb.yaml").read_text())
    bad["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = deployment()
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_base_manifest():
    k = kustomization()
    assert k["kind"] == "Kustomization" and k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    base = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in NOT_API_OBJECTS)
    assert sorted(k["resources"]) == base
    ns = objects()[("Namespace", k["namespace"])]
    assert ns["metadata"]["name"] == k["namespace"]
    assert {i["name"] for i in k["images"]} == {server_container()["image"].split(":")[0]}


def test_server_command_ports_and_probes_match_the_cli():
    from hnd.server.service import SERVICE_NAME

    ns = server_args()
    c = server_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ns.host == "0.0.0.0"
    assert ns.metrics_host == "0.0.0.0", "Prometheus scrapes the pod IP: /metrics must not stay on loopback"
    assert ports == {"grpc": grpc_port(ns), "grpc-health": ns.health_port, "metrics": ns.metrics_port}
    assert ns.device == "cuda"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c[probe]["grpc"]  # kubelet's own gRPC probe on grpc.health.v1, plain text: the health port
        assert g["port"] == ns.health_port, probe
        assert g.get("service", "") in (SERVICE_NAME, ""), probe
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # the inference service itself
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ns.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_server_image_user_ports_and_entrypoint_fit():
    ins = parse_dockerfile(DOCKERFILES["server"])
    run = " ".join(i.args for i in ins if i.keyword == "RUN")
    uid = int(re.search(r"--uid (\d+)", run).group(1))
    gid = int(re.search(r"--gid (\d+)", run).group(1))
    sec = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert (sec["runAsUser"], sec["runAsGroup"], sec["fsGroup"]) == (uid, gid, gid)
    exposed = {int(p.split("/")[0]) for i in ins if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed <= {p["containerPort"] for p in server_container()["ports"]}
    entry = next(i for i in ins if i.keyword == "ENTRYPOINT").exec_form()
    assert entry == ["hnd-server"] and "command" not in server_container()  # args replace CMD only
    assert server_container()["image"] == compose()["services"]["server"]["image"]


def test_secrets_and_checkpoint_are_mounted_where_the_flags_point():
    ns = server_args()
    c = server_container()
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def source(path: str) -> tuple[dict, str]:
        """(the volume, the key inside it) that a file path lands in."""
        for mount_path, m in mounts.items():
            if path.startswith(mount_path.rstrip("/") + "/"):
                assert m.get("readOnly"), f"{mount_path} must be read-only"
                return volumes[m["name"]], path[len(mount_path.rstrip("/")) + 1 :]
        raise AssertionError(f"{path} is on no mounted volume")

    tls, cert_key = source(ns.tls_cert)
    assert source(ns.tls_key)[0] is tls
    # A kubernetes.io/tls Secret (kubectl create secret tls) holds tls.crt and tls.key.
    assert (cert_key, source(ns.tls_key)[1]) == ("tls.crt", "tls.key")
    token, token_key = source(ns.token_file)
    assert token["secret"]["secretName"] != tls["secret"]["secretName"]
    assert token_key == "token"
    for secret in (tls, token):
        assert secret["secret"]["defaultMode"] & 0o007 == 0, "secrets must not be world-readable"
    model, _ = source(ns.checkpoint)
    claim = model["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = objects()[("PersistentVolumeClaim", claim["claimName"])]
    assert set(pvc["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"}, "every replica mounts it"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m == "/tmp" for m in mounts), "a writable /tmp on a read-only root"


def test_gpu_resources_and_drain_timing():
    ns = server_args()
    c = server_container()
    res = c["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == int(res["requests"]["nvidia.com/gpu"]) == 1
    for kind in ("cpu", "memory"):
        assert kind in res["requests"] and kind in res["limits"]
    spec = deployment()["spec"]["template"]["spec"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The kubelet sends SIGKILL after the grace period, counted from the start of preStop.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + ns.drain_seconds + 5
    # A draining replica (NOT_SERVING) must outlive its drain before liveness would restart it.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > ns.drain_seconds
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120  # load + warm-up
    rolling = deployment()["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_service_pdb_and_hpa_select_the_deployment():
    objs = objects()
    dep = deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = objs[("Service", "hnd-server")]
    assert svc["spec"]["clusterIP"] == "None", "headless: DNS lists every replica for client-side balancing"
    assert svc["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in server_container()["ports"]}
    ns = server_args()
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["grpc"]["port"] == grpc_port(ns) and by_name["grpc"]["targetPort"] in names
    assert by_name["metrics"]["port"] == ns.metrics_port and by_name["metrics"]["targetPort"] in names
    pdb = objs[("PodDisruptionBudget", "hnd-server")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objs[("HorizontalPodAutoscaler", "hnd-server")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a disruption leaves a replica serving"


def test_hpa_metrics_come_from_adapter_rules_over_metrics_the_server_exports():
    from hnd.server.metrics import ServerMetrics

    exported = set()
    for family in ServerMetrics().registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    produced = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"\s*([a-z_]+)\{", rule["seriesQuery"]).group(1)
        assert series in exported, f"adapter rule reads {series}, which hnd-server does not export"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        produced[rule["name"]["as"]] = rule
    hpa = objects()[("HorizontalPodAutoscaler", "hnd-server")]
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods"
        assert m["pods"]["metric"]["name"] in produced, f"no adapter rule produces {m['pods']['metric']['name']}"
    # The request rate counts inference only (not GetModelInfo) under the label names the server uses.
    query = produced["hnd_inference_requests_per_second"]["metricsQuery"]
    assert 'method=~"Infer|InferStream"' in query
    assert {"Infer", "InferStream"} <= _methods_counted()


def _methods_counted() -> set[str]:
    from hnd.server.service import SplitInferenceService

    return {name for name in ("Infer", "InferStream", "GetModelInfo") if hasattr(SplitInferenceService, name)}


def test_edge_example_dials_the_headless_service_with_flags_the_edge_accepts():
    from hnd.edge.client import check_target

    k = kustomization()
    job = objects()[("Job", "hnd-edge-replay")]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    ns = parse_cli("hnd-edge", c["args"], "examples/edge-job.yaml args")
    assert check_target(ns.server) == ns.server
    svc = objects()[("Service", "hnd-server")]
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert ns.server == f"dns:///{svc['metadata']['name']}.{k['namespace']}.svc.cluster.local:{port}"
    assert ns.lb == "round_robin"
    assert ns.head and ns.checkpoint is None, "edges get the head only"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for path in (ns.head, ns.video, ns.tls_ca, ns.token_file, ns.output):
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is on no mounted volume"


def pod_specs() -> dict[str, dict]:
    """``{"Kind/name": pod spec}`` of every workload (Deployment, Job) in deploy/k8s."""
    return {
        f"{kind}/{name}": d["spec"]["template"]["spec"]
        for (kind, name), d in objects().items()
        if kind in ("Deployment", "Job")
    }


def test_pods_are_locked_down_and_mount_only_defined_volumes():
    """Every pod: seccomp RuntimeDefault, non-root, read-only root file system, no privilege escalation or
    capabilities; every claim it mounts is defined here; what it writes goes to an emptyDir (the edge Job
    had none of the first three and mounted an undefined claim)."""
    objs = objects()
    specs = pod_specs()
    assert {"Deployment/hnd-server", "Job/hnd-edge-replay"} <= set(specs)
    for where, spec in specs.items():
        sec = spec["securityContext"]
        assert sec["seccompProfile"]["type"] == "RuntimeDefault", where
        assert sec["runAsNonRoot"] is True, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            kinds = set(v) - {"name"}
            assert kinds <= {"persistentVolumeClaim", "secret", "emptyDir", "configMap"}, f"{where}: {v}"
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in objs, f"{where}: claim {claim} is defined nowhere"
        for c in spec["containers"]:
            csec = c["securityContext"]
            assert csec["readOnlyRootFilesystem"] is True, where
            assert csec["allowPrivilegeEscalation"] is False and csec["capabilities"]["drop"] == ["ALL"], where
            for m in c["volumeMounts"]:
                volume = volumes[m["name"]]
                assert m.get("readOnly") or "emptyDir" in volume, f"{where}: {m['mountPath']} is writable"
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{where}: no writable /tmp"


def test_the_hpa_owns_the_replica_count():
    """`replicas:` in a Deployment that an HPA scales is reset to that value by every `kubectl apply -k`."""
    scaled = {
        o["spec"]["scaleTargetRef"]["name"]
        for (kind, _), o in objects().items()
        if kind == "HorizontalPodAutoscaler" and o["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    }
    assert "hnd-server" in scaled
    for name in scaled:
        assert "replicas" not in objects()[("Deployment", name)]["spec"], f"Deployment {name}: the HPA owns replicas"


def test_readiness_tolerates_a_slow_answer_and_still_sees_a_drain():
    """One late health answer under load must not take a replica out of the Service (failureThreshold 1
    with a 2 s timeout did); a drain (NOT_SERVING for --drain-seconds) must still show before it ends."""
    ns = server_args()
    ready = server_container()["readinessProbe"]
    assert ready["failureThreshold"] >= 3
    assert ready["timeoutSeconds"] >= 5
    assert ready["periodSeconds"] * ready["failureThreshold"] < ns.drain_seconds


def test_network_policy_opens_grpc_and_keeps_metrics_to_prometheus():
    """The metrics port (no TLS, no auth) is reachable only from the monitoring namespace; gRPC and the
    health port stay open to the edges and probes."""
    policy = objects()[("NetworkPolicy", "hnd-server")]["spec"]
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    names = {p["name"] for p in server_container()["ports"]}
    open_ports, restricted = set(), {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in names, f"NetworkPolicy names port {port['port']}, which the container lacks"
            if rule.get("from"):
                restricted[port["port"]] = rule["from"]
            else:
                open_ports.add(port["port"])
    assert open_ports == {"grpc", "grpc-health"}
    assert set(restricted) == {"metrics"}
    (peer,) = restricted["metrics"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_deploy_md_upload_pods_are_valid_and_mount_defined_claims(no_network):
    """The helper pods DEPLOY.md starts with `kubectl run --overrides` to fill the volumes are valid Pods
    (strict schema) that mount claims deploy/k8s defines; the files `kubectl apply -f` names exist."""
    import json

    import kubernetes_validate

    text = deploy_text()
    overrides = re.findall(r"kubectl -n hnd run (\S+) .*?--overrides='(\{.*?\})'", text)
    claims = set()
    for name, spec in overrides:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, **json.loads(spec)}
        kubernetes_validate.validate(pod, VERSIONS[-1], strict=True)
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims == {"hnd-models", "hnd-edge-data"}
    for claim in claims:
        assert ("PersistentVolumeClaim", claim) in objects()
    for path in re.findall(r"kubectl apply (?:-n hnd )?-f (\S+)", text):
        assert (ROOT / path).is_file(), path
