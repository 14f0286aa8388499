"""What a failure inside an engine step means: its cause (the `reason` label of
mcserve:request_failures_total) and whether the device still works.

The engine's rule (llm_engine.py): a failure fails the sequences it concerns and the loop goes on;
only a device that fails a trivial probe after a failed step ends the engine (EngineDeadError).
"""

from __future__ import annotations

import torch

# Every label the failure counter can carry, so that dashboards see zeros before the first failure.
FAILURE_REASONS = ("oom", "assertion", "device", "unschedulable", "error")


class Unschedulable(Exception):
    """The scheduler made no progress on a sequence for many steps in a row."""


def failure_reason(error: BaseException) -> str:
    """The metrics label of a failure: one of FAILURE_REASONS."""
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"
    if isinstance(error, AssertionError):
        return "assertion"
    if isinstance(error, Unschedulable):
        return "unschedulable"
    if isinstance(error, torch.AcceleratorError) or "CUDA error" in str(error):
        return "device"
    return "error"


def describe(error: BaseException) -> str:
    """One line for the client: the exception's type and message, nothing of the traceback."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def device_usable(device: torch.device) -> bool:
    """A trivial round trip on `device`. A CUDA error that corrupts the context (an illegal memory
    access, a device-side assert) is sticky: every later call fails, so this one does too."""
    if device.type == "cpu":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # any failure here means the device cannot serve
        return False
