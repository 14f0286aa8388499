"""The deploy files parse and agree with each other and with the code: metric names in the Grafana
dashboard, ports, probe paths, the API-key variable, file paths they mount or copy.

No Docker engine or Kubernetes cluster here: these checks are static.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mcserve.server.engine.outputs import Delta, Usage
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import DEFAULT_DRAIN_TIMEOUT_S

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mcserve.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
# What the dashboard must show (the brief of deploy/): metric families, without sample suffixes.
REQUIRED = {
    "mcserve:num_requests_running",
    "mcserve:num_requests_waiting",
    "mcserve:time_to_first_token_seconds",
    "mcserve:inter_token_latency_seconds",
    "mcserve:e2e_request_latency_seconds",
    "mcserve:generation_tokens",
    "mcserve:prefix_cache_hits",
    "mcserve:prefix_cache_queries",
    "mcserve:checkpoint_pool_usage",
    "mcserve:state_slot_usage",
    "mcserve:checkpoint_evictions",
    "mcserve:checkpoint_offloads",
    "mcserve:num_preemptions",
    "mcserve:http_requests",
    "mcserve:server_ready",
}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _exported() -> tuple[dict[str, str], dict[str, set[str]]]:
    """{sample name: family name} that a fresh EngineMetrics can export, and the label names each
    family's samples carry once every recording method has run."""
    m = EngineMetrics("m")
    m.on_queue_time(0.1)
    m.on_preemption()
    m.on_prefix_cache_query(8, 4)
    m.count_eviction("unreferenced")
    m.count_offload()
    m.count_ssc_selections(0, 2)
    m.count_http("/v1/chat/completions", 200)
    tracker = m.track(3)
    tracker.on_delta(Delta("r", 0, (5,), "a", finish_reason="stop", usage=Usage(3, 1)))
    tracker.finish(1)
    samples: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for suffix in SUFFIXES[family.type]:
            samples[family.name + suffix] = family.name
        for s in family.samples:
            labels.setdefault(family.name, set()).update(s.labels)
    return samples, labels


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_dashboard_metric_is_exported_and_the_required_ones_are_shown() -> None:
    samples, labels = _exported()
    exprs = _exprs()
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names = re.findall(r"(?:mcserve:|process_)[A-Za-z0-9_]+", expr)
        assert names, expr
        assert 'instance=~"$instance"' in expr, expr  # every panel follows the instance variable
        for name in names:
            assert name in samples, f"{name} (in {expr!r}) is not exported by server/metrics.py"
            used.add(samples[name])
        # Labels grouped on or matched must exist on the metrics of that expression.
        # (instance and job are the target's, added by Prometheus at scrape time.)
        have = {"le", "instance", "job"} | set().union(*(labels[samples[n]] for n in names))
        grouped = [x.strip() for g in re.findall(r"by \(([^)]*)\)", expr) for x in g.split(",")]
        matched = re.findall(r"[{,] *([a-z_]+)=~?\"", expr)
        for label in grouped + matched:
            assert label in have, f"label {label!r} in {expr!r} is not on {names}"
    assert REQUIRED <= used, REQUIRED - used


def test_histogram_quantiles_read_buckets_and_rates_read_counters() -> None:
    for expr in _exprs():
        for name in re.findall(r"histogram_quantile\([^,]+, sum by \([^)]*\) \(rate\((mcserve:[A-Za-z0-9_]+)", expr):
            assert name.endswith("_bucket"), expr
        for name in re.findall(r"rate\((mcserve:[A-Za-z0-9_]+)", expr):
            assert name.endswith(("_total", "_bucket")), expr


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    source = _load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] for t in p["targets"])
    provider = _load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "mcserve.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_wires_mcserve_prometheus_and_grafana() -> None:
    compose = _load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"mcserve", "mcserve-cpu", "prometheus", "grafana"}
    gpu, cpu = services["mcserve"], services["mcserve-cpu"]
    assert gpu["build"]["args"]["DEVICE"] == "cuda" and cpu["build"]["args"]["DEVICE"] == "cpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "mcserve" in cpu["networks"]["default"]["aliases"]  # the name Prometheus scrapes
    for svc in (gpu, cpu):
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["ports"] == ["${MCSERVE_PORT:-8000}:8000"]
        assert "MCSERVE_API_KEY" in svc["environment"]
        assert float(svc["stop_grace_period"].rstrip("s")) > DEFAULT_DRAIN_TIMEOUT_S  # docker stop lets it drain
    # Every bind mount's source exists (the models folder is created by Docker when missing).
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and source != "./models":
                assert (DEPLOY / source).exists(), (name, volume)
    scrape = _load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert [(s["metrics_path"], s["static_configs"][0]["targets"]) for s in scrape] == [("/metrics", ["mcserve:8000"])]


def _dockerfile_uid() -> int:
    (user,) = re.findall(r"^USER (\d+):\d+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    return int(user)


def test_dockerfile_serves_on_all_interfaces_as_non_root_with_a_health_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert _dockerfile_uid() != 0
    assert 'ENTRYPOINT ["mcserve", "serve", "--host", "0.0.0.0"]' in text
    (check,) = re.findall(r"^HEALTHCHECK .*\n\s+CMD (\[.*\])$", text, flags=re.M)
    assert "/health" in " ".join(json.loads(check))
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, flags=re.M)
    assert re.search(r"^ARG DEVICE=cuda$", text, flags=re.M) and "download.pytorch.org/whl/cpu" in text
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 4  # bases, build, runtime
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for path in copied.split():
            assert (ROOT / path).exists() and path not in ignored, path


def test_console_scripts_point_at_the_clients() -> None:
    tomllib = pytest.importorskip("tomllib")
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("mcserve-chat", "mcserve-bench"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func))
