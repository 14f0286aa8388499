"""GET /health: the server's state -- loading, ready, draining or dead -- and the engine watchdog's
figures, as JSON. 200 only when ready, 503 otherwise, so a load balancer or a Kubernetes probe can go
by the status alone and a person by the body.

Draining (server/api/drain.py's `Drain`, begun on SIGTERM) is the state above the engine's: new
requests get 503, in-flight ones finish. Dead wins over draining (nothing will finish), draining over
loading.
"""

from __future__ import annotations

from typing import Any, Literal

from mcserve.server.api.drain import Drain
from mcserve.server.engine.client import EngineClient

ServerState = Literal["loading", "ready", "draining", "dead"]


def health_report(engine: EngineClient, drain: Drain) -> tuple[dict[str, Any], int]:
    """(JSON body, HTTP status) of /health."""
    h = engine.health()
    state: ServerState = "dead" if h.state == "dead" else "draining" if drain.draining else h.state
    body: dict[str, Any] = {"status": state}
    if h.error is not None:
        body["error"] = h.error
    body["watchdog"] = {
        "slow_step_s": h.slow_step_s,
        "slow_steps": h.slow_steps,
        "last_slow_step_s": None if h.last_slow_step_s is None else round(h.last_slow_step_s, 4),
        "step_running_s": round(h.step_running_s, 4),
        "stalled": h.stalled,
    }
    return body, 200 if state == "ready" else 503
