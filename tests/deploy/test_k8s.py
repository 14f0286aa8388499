"""deploy/k8s: every overlay builds with `kubectl kustomize`, every object is valid against the Kubernetes
schemas (kubernetes-validate, strict), and the rendered objects agree with each other and with the
server: probes, drain timeout vs grace period, HPA metric vs adapter rule vs exported metric, the
router's configuration vs deploy/nginx."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ENV_PREFIX, ApiSettings
from tests.deploy.tools import binary

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes still maintained when this was written, and the newest the validator knows.
VERSIONS = ("1.32.0", "1.37.0")


def build(overlay: str) -> list[dict]:
    out = subprocess.run(
        [binary("kubectl"), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_there_are_gpu_and_cpu_overlays() -> None:
    assert OVERLAYS == ["cpu", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_object_is_valid(overlay: str) -> None:
    objects = build(overlay)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
         "HorizontalPodAutoscaler", "PodMonitor"}
    )
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by hand below
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "mcserve", obj["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_grace_period_agree(overlay: str) -> None:
    objs = by_kind(build(overlay))
    pod = objs[("Deployment", "mcserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = objs[("ConfigMap", "mcserve")]["data"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    drain = float(config["MCSERVE_DRAIN_TIMEOUT"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = float(pre_stop[1])
    # Draining is 503 on /health: readiness drops the pod within one period...
    assert readiness["failureThreshold"] * readiness["periodSeconds"] <= 5
    # ...but liveness must not restart it before the drain is over.
    assert liveness["failureThreshold"] * liveness["periodSeconds"] > sleep_s + drain
    # The kubelet's SIGKILL comes after preStop + drain, with a margin for the last writes.
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + drain + 5
    assert sleep_s >= 5  # >= the router's DNS re-resolution (valid=5s in router/mcserve.conf)
    settings = ApiSettings.from_env(config)  # every variable is one the server reads, with a valid value
    assert settings.drain_timeout == drain
    fields = dataclasses.fields(ApiSettings)
    known = {ENV_PREFIX + ("API_KEY" if f.name == "api_keys" else f.name.upper()) for f in fields}
    assert set(config) <= known and {e["name"] for e in container["env"]} <= known
    secret = objs[("Secret", "mcserve-api-key")]
    ref = {e["name"]: e for e in container["env"]}["MCSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secret["stringData"]


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not() -> None:
    gpu = by_kind(build("gpu"))[("Deployment", "mcserve")]["spec"]["template"]["spec"]
    cpu = by_kind(build("cpu"))[("Deployment", "mcserve")]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu" and gpu["containers"][0]["image"] == "mcserve:cuda"
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and "tolerations" not in cpu
    assert cpu["containers"][0]["image"] == "mcserve:cpu" and "--device" in cpu["containers"][0]["args"]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_services_router_pdb_hpa_and_podmonitor_select_what_they_should() -> None:
    objs = by_kind(build("cpu"))
    server = objs[("Deployment", "mcserve")]
    router = objs[("Deployment", "mcserve-router")]
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    front, replicas = objs[("Service", "mcserve")], objs[("Service", "mcserve-replicas")]
    assert _selects(front["spec"]["selector"], router_labels) and not _selects(front["spec"]["selector"], server_labels)
    assert replicas["spec"]["clusterIP"] == "None"  # headless: DNS gives the router every ready pod
    assert _selects(replicas["spec"]["selector"], server_labels)
    assert not _selects(replicas["spec"]["selector"], router_labels)
    pdb = objs[("PodDisruptionBudget", "mcserve")]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], server_labels) and pdb["spec"]["maxUnavailable"] == 1
    monitor = objs[("PodMonitor", "mcserve")]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], server_labels)
    assert not _selects(monitor["spec"]["selector"]["matchLabels"], router_labels)
    assert monitor["spec"]["podMetricsEndpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert server["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    hpa = objs[("HorizontalPodAutoscaler", "mcserve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mcserve"}
    assert hpa["minReplicas"] >= 2  # session affinity is only interesting with more than one
    # The router mounts the generated ConfigMap (kustomize rewrote its hashed name in the volume).
    (volume,) = [v for v in router["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    generated = objs[("ConfigMap", volume["configMap"]["name"])]
    assert generated["data"]["mcserve.conf"] == (K8S / "base" / "router" / "mcserve.conf").read_text()
    fqdn = re.search(r"server (\S+):8000 resolve", generated["data"]["mcserve.conf"]).group(1)
    assert fqdn == f"{replicas['metadata']['name']}.{replicas['metadata']['namespace']}.svc.cluster.local"


def test_hpa_metric_is_what_the_adapter_rule_makes_of_an_exported_gauge() -> None:
    hpa = yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    wanted = metric["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load((ROOT / "deploy" / "prometheus" / "adapter.yaml").read_text())["rules"]["custom"]
    series = re.match(r"([a-z_:]+)\{", rule["seriesQuery"]).group(1)
    assert re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series) == wanted
    exported = {f.name: f.type for f in EngineMetrics("m").registry.collect()}
    assert exported[series] == "gauge"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def _without_comments(text: str) -> list[str]:
    return [line for line in (x.split("#")[0].rstrip() for x in text.splitlines()) if line]


def test_router_in_kubernetes_is_the_tested_nginx_config_with_a_resolved_upstream() -> None:
    local = _without_comments((ROOT / "deploy" / "nginx" / "mcserve.conf").read_text())
    cluster = _without_comments((K8S / "base" / "router" / "mcserve.conf").read_text())
    only_local = [x for x in local if x not in cluster]
    only_cluster = [x for x in cluster if x not in local]
    assert all(re.fullmatch(r"\s+server 127\.0\.0\.1:800\d max_fails=0;", x) for x in only_local), only_local
    assert [x.strip().split()[0] for x in only_cluster] == ["resolver", "zone", "server"], only_cluster
    assert any("hash $mcserve_route_key consistent;" in x for x in local)
