"""Which grammar engine serves structured outputs: llguidance when it is installed, else none.

llguidance is a declared dependency, but an environment can lack it (a wheel missing for a platform,
an image built from a fixed set of wheels). The engine must still load and serve everything else, so
nothing outside this package imports llguidance: `load_grammars` imports `compiler.py` and
`masks.py` (which do) only once llguidance is known to import. Without it a request that asks for a
grammar is a 400 that names the missing package (`unavailable_error`), never a failed start.

The grammar's verdict on a token (`GrammarStatus`, `GrammarError`) lives here, so the engine can
read it without importing llguidance.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Literal

from mcserve.server.engine.structured.spec import StructuredSpec
from mcserve.server.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from mcserve.server.engine.structured.compiler import GrammarCompiler
    from mcserve.server.engine.structured.masks import TokenMasks

log = logging.getLogger(__name__)

PACKAGE = "llguidance"
GrammarStatus = Literal["open", "done"]  # after a token: "done" = only eos may follow


class GrammarError(Exception):
    """The grammar cannot continue (a token it rejects, or a parser limit hit); the message says which."""


def load_grammars(tokenizer_json: str, eos_token_ids: Iterable[int]) -> tuple[GrammarCompiler, TokenMasks] | None:
    """The compiler and the per-step masks over this tokenizer; None when llguidance is not installed
    (logged once: the server then refuses structured outputs)."""
    try:
        importlib.import_module(PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != PACKAGE:
            raise  # llguidance is there but broken: not a condition to serve around
        log.warning("the %s package is not installed: structured outputs and forced tool calls are refused (400)",
                    PACKAGE)
        return None
    from mcserve.server.engine.structured.compiler import GrammarCompiler
    from mcserve.server.engine.structured.masks import TokenMasks

    compiler = GrammarCompiler(tokenizer_json, eos_token_ids)
    return compiler, TokenMasks(compiler)


def unavailable_error(spec: StructuredSpec) -> InvalidRequestError:
    return InvalidRequestError(
        f"{spec.param}: this server cannot constrain output to a grammar (structured outputs, "
        f"tool_choice 'required' or a named function): the {PACKAGE} package is not installed",
        param=spec.param, code="structured_outputs_unavailable")
