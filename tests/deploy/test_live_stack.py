"""The shipped configs, run for real on loopback: two `mcserve serve` processes (default model, CPU)
behind nginx with deploy/nginx/mcserve.conf, and a Prometheus (Debian package) scraping both with
deploy/prometheus/rules. Also `promtool check config|rules` and `promtool test rules`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.test_deploy_files import _exprs
from tests.deploy.tools import binary
from tests.live_server import LiveServer, free_port, live_mcserves

ROOT = Path(__file__).parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "mcserve.yml"


def test_promtool_checks_the_config_and_rules_and_runs_the_rule_unit_tests() -> None:
    promtool = binary("promtool")
    for args in (["check", "config", str(PROM / "prometheus.yml")], ["check", "rules", str(RULES)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(
        [promtool, "test", "rules", "tests/mcserve.test.yml"], cwd=PROM, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


def test_the_rule_tests_cover_every_alert() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "tests" / "mcserve.test.yml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert alerts == tested


@dataclass
class Stack:
    replicas: list[LiveServer]
    router: str  # nginx base URL
    prometheus: str  # Prometheus base URL


def _wait(url: str, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} not ready:\n{log.read_text(errors='replace')}"
        time.sleep(0.2)


def _nginx_conf(tmp: Path, ports: list[int], listen: int) -> Path:
    site = (ROOT / "deploy" / "nginx" / "mcserve.conf").read_text()
    assert "server 127.0.0.1:8001 max_fails=0;" in site and "listen 8000;" in site
    site = site.replace("127.0.0.1:8001", f"127.0.0.1:{ports[0]}").replace("127.0.0.1:8002", f"127.0.0.1:{ports[1]}")
    # For the test only: say which replica answered.
    site = site.replace("listen 8000;", f"listen 127.0.0.1:{listen};\n    add_header X-Upstream $upstream_addr always;")
    (tmp / "mcserve.conf").write_text(site)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers must reach the temp folders in tmp
    main = f"""{user}worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/mcserve.conf;
}}
"""
    (tmp / "nginx.conf").write_text(main)
    return tmp / "nginx.conf"


def _prometheus_conf(tmp: Path, ports: list[int]) -> Path:
    conf = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "mcserve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(conf))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx, prometheus = binary("nginx"), binary("prometheus")
    tmp = tmp_path_factory.mktemp("stack")
    procs: list[subprocess.Popen] = []
    with live_mcserves(tmp, 2) as replicas:
        try:
            ports = [r.port for r in replicas]
            listen, prom_port = free_port(), free_port()
            ngx = tmp / "nginx"
            ngx.mkdir()
            conf = _nginx_conf(ngx, ports, listen)
            log = tmp / "nginx.out"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([nginx, "-c", str(conf), "-g", "daemon off;"], stdout=out, stderr=out))
            _wait(f"http://127.0.0.1:{listen}/router-health", "nginx", procs[-1], ngx / "error.log")
            pconf = _prometheus_conf(tmp, ports)
            plog = tmp / "prometheus.log"
            with open(plog, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            prometheus,
                            f"--config.file={pconf}",
                            f"--storage.tsdb.path={tmp / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}",
                        ],
                        stdout=out,
                        stderr=out,
                    )
                )
            _wait(f"http://127.0.0.1:{prom_port}/-/ready", "prometheus", procs[-1], plog)
            yield Stack(replicas, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{prom_port}")
        finally:
            for p in procs:
                p.terminate()
                p.wait(20)


def _chat(stack: Stack, session: str | None, messages: list[dict]) -> httpx.Response:
    headers = {"X-Session-Id": session} if session else {}
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    r = httpx.post(stack.router + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_every_turn_of_a_session_reaches_one_replica_and_its_cache_grows(stack: Stack) -> None:
    upstreams: dict[str, set[str]] = {}
    for s in range(4):
        session = f"conversation-{s}"
        messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
        cached = []
        for turn in range(4):
            messages.append({"role": "user", "content": f"Tell me about the number {turn} in a few words."})
            r = _chat(stack, session, messages)
            upstreams.setdefault(session, set()).add(r.headers["x-upstream"])
            body = r.json()
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        assert len(upstreams[session]) == 1, upstreams
        # Turn 1 has nothing cached; each later turn reuses at least what the previous prompt had.
        assert cached[0] == 0 and all(b > a for a, b in zip(cached, cached[1:], strict=False)), cached
    replicas = {f"127.0.0.1:{r.port}" for r in stack.replicas}
    assert set().union(*upstreams.values()) <= replicas


def _query(stack: Stack, expr: str) -> list[dict]:
    r = httpx.get(stack.prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _poll(stack: Stack, expr: str, ok, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = _query(stack, expr)
        if ok(result):
            return result
        assert time.monotonic() < deadline, (expr, result)
        time.sleep(0.5)


def test_prometheus_scrapes_both_replicas_and_answers_for_the_request_counter(stack: Stack) -> None:
    before = sum(
        float(s["value"][1])
        for s in _query(stack, 'mcserve:http_requests_total{route="/v1/chat/completions",status="200"}')
    )
    for k in range(3):
        _chat(stack, None, [{"role": "user", "content": f"Hello number {k}"}])
    total = 'sum(mcserve:http_requests_total{job="mcserve",route="/v1/chat/completions",status="200"})'
    result = _poll(stack, total, lambda r: r and float(r[0]["value"][1]) >= before + 3)
    assert float(result[0]["value"][1]) >= before + 3
    up = _poll(stack, 'up{job="mcserve"}', lambda r: len(r) == 2 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["instance"] for s in up} == {f"127.0.0.1:{r.port}" for r in stack.replicas}
    build = _query(stack, "mcserve:build_info")
    assert len(build) == 2 and all(s["metric"]["version"] for s in build)
    assert len(_query(stack, "process_resident_memory_bytes")) == 2


def test_every_dashboard_query_evaluates_to_data_and_the_recording_rules_run(stack: Stack) -> None:
    _chat(stack, None, [{"role": "user", "content": "Warm up the histograms."}])
    time.sleep(2.5)  # two more scrapes, so every rate has two points
    empty = []
    for expr in _exprs():
        q = expr.replace("$model_name", ".*").replace("$instance", ".*").replace("$__rate_interval", "1m")
        if not _query(stack, q):
            empty.append(q)
    assert not empty, f"dashboard queries with no data (a panel would say 'No data'): {empty}"
    # The recording group is evaluated every 15 s.
    _poll(stack, "instance:mcserve_http_requests:rate5m", lambda r: len(r) == 2, timeout_s=45)
    rules = httpx.get(stack.prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
    assert len(health) == 15 and set(health.values()) <= {"ok", "unknown"}, health


def test_last_a_draining_replica_answers_503_and_nginx_retries_the_session_on_the_other(stack: Stack) -> None:
    """Runs last in this module: it stops one replica."""
    session = "moving-conversation"
    first = _chat(stack, session, [{"role": "user", "content": "Hi"}]).headers["x-upstream"]
    (draining,) = [r for r in stack.replicas if f"127.0.0.1:{r.port}" == first]
    (other,) = [r for r in stack.replicas if r is not draining]
    # A long stream keeps the replica draining while the session's next turn arrives.
    long = {"prompt": "Once", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", draining.url + "/v1/completions", json=long, timeout=120) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the response, which aborts the stream
        assert next(x for x in lines if x).startswith("data: ")
        draining.proc.send_signal(signal.SIGTERM)
        _poll_http(draining.url + "/health", 503, draining)
        r = _chat(stack, session, [{"role": "user", "content": "Hi again"}])
        # nginx tried the session's replica, got its 503, and retried on the next one of the ring.
        assert r.headers["x-upstream"] == f"{first}, 127.0.0.1:{other.port}"
        assert next(x for x in lines if x).startswith("data: ")  # the draining replica still streams
    assert draining.proc.wait(60) == 0


def _poll_http(url: str, status: int, server: LiveServer, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == status:
                return
        except httpx.TransportError as e:
            raise AssertionError(f"{url}: {e}\n{server.log_text()[-3000:]}") from e
        assert time.monotonic() < deadline, url
        time.sleep(0.05)
