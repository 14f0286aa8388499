"""schemathesis against a real `mcserve serve`, driven by the server's own `/openapi.json` (whatever it
describes: the fuzzer follows the schema as served), with the API key. Fails on any 5xx and on any
response that violates the schema (`not_a_server_error`, `response_schema_conformance`,
`content_type_conformance`); the server must still answer /health with 200 at the end.

    nice python benchmarks/fuzz_api.py --max-examples 250      # >= 2,000 cases over the operations

Prints the number of generated cases per operation and the failures schemathesis reports (its JSON
report is kept under --report-dir). Exit status 0 when there are none and enough cases ran.

A run whose only errors come from schemathesis' own case generation (no request sent, no check
failed: e.g. CPython 3.11's "AST constructor recursion depth mismatch" inside hypothesis' lambda
introspection, surfacing as a FlakyFailure) says nothing about the server; it is reported and the run
is repeated once with the next seed. A check failure is never retried.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
from live_server import API_KEY, LiveServer

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


# NonFatalError types raised while schemathesis builds a case, before anything reaches the server.
GENERATOR_ERRORS = frozenset({"FlakyFailure", "SystemError", "RecursionError"})


def count_cases(ndjson: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """(cases per operation, failure descriptions, fuzzer-internal errors) from schemathesis' NDJSON
    event stream."""
    cases: dict[str, int] = {}
    failures: list[str] = []
    internal: list[str] = []
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        (kind, data), = event.items()
        if kind == "ScenarioFinished":
            recorder = data.get("recorder") or {}
            label = recorder.get("label", "?")
            cases[label] = cases.get(label, 0) + len(recorder.get("cases", {}))
            for check_list in (recorder.get("checks") or {}).values():
                for check in check_list:
                    if str(check.get("status")).lower() == "failure":
                        failures.append(f"{label}: {check.get('name')}: {check.get('failure_info') or ''}"[:400])
        elif kind == "NonFatalError":
            value = data.get("value") or {}
            target = internal if value.get("type") in GENERATOR_ERRORS else failures
            target.append(f"error: {str(data)[:400]}")
    return cases, failures, internal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=250, help="cases per operation and phase")
    ap.add_argument("--min-cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-dir", default="/tmp/mcserve-fuzz")
    ap.add_argument("--model")
    ap.add_argument("--server-args", default="--max-model-len 512",
                    help="a short context keeps generated max_tokens cheap on CPU")
    args = ap.parse_args()
    report = Path(args.report_dir)
    for attempt in range(2):
        status, internal = run_once(args, report / f"run{attempt}", args.seed + attempt)
        if status != "internal":
            return 0 if status == "ok" else 1
        print(f"attempt {attempt + 1}: only fuzzer-internal generation errors, repeating with the next seed:")
        for e in internal[:5]:
            print(f"  {e}")
    return 1


def run_once(args: argparse.Namespace, report: Path, seed: int) -> tuple[str, list[str]]:
    """One schemathesis run against a fresh server: ("ok" | "fail" | "internal", internal errors)."""
    report.mkdir(parents=True, exist_ok=True)
    ndjson = report / "events.ndjson"
    ndjson.unlink(missing_ok=True)
    with LiveServer(args.model, tuple(shlex.split(args.server_args))) as srv:
        # One worker: CPython 3.11 keeps the AST validator's recursion depth per interpreter, not per
        # thread, so hypothesis introspecting lambdas in two workers at once (path parameters do, and
        # the session routes brought two more) races into "AST constructor recursion depth mismatch".
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", srv.url + "/openapi.json", "--checks", CHECKS,
               "--max-examples", str(args.max_examples), "--seed", str(seed), "--workers", "1",
               "--header", f"Authorization: Bearer {API_KEY}", "--request-timeout", "120",
               "--generation-database", "none", "--no-color", "--report", "ndjson",
               "--report-ndjson-path", str(ndjson), "--suppress-health-check", "all", "--continue-on-failure"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=report)  # its .schemathesis cache goes there
        healthy = httpx.get(srv.url + "/health", timeout=10).status_code == 200
        paths = sorted(httpx.get(srv.url + "/openapi.json", headers=srv.headers, timeout=10).json()["paths"])
    (report / "output.txt").write_text(done.stdout + done.stderr)
    cases, failures, internal = count_cases(ndjson)
    total = sum(cases.values())
    print(f"schema paths: {paths}")
    print(f"{total} generated cases: " + ", ".join(f"{k} {v}" for k, v in sorted(cases.items())))
    print(f"schemathesis exit {done.returncode}; {len(failures)} failures; {len(internal)} fuzzer-internal "
          f"errors; /health {'200' if healthy else 'NOT 200'}")
    for f in failures[:20]:
        print(f"  {f}")
    if done.returncode not in (0, 1) or not cases:
        print((done.stdout + done.stderr)[-3000:])
    if failures or not healthy or total < args.min_cases or done.returncode not in (0, 1):
        return "fail", internal
    if internal:
        return "internal", internal
    return ("ok" if done.returncode == 0 else "fail"), internal

if __name__ == "__main__":
    raise SystemExit(main())
