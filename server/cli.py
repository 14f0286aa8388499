"""`mcserve serve [MODEL_DIR]` and `mcserve init-model DIR`.

`serve` starts listening at once (GET /health answers 503 while the model loads), loads the engine
in a background thread, then prints the URL to use. Heavy modules (torch, the engine) are imported
only inside the commands, so `mcserve --help` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcserve.kernels.mc_spec import AGGREGATIONS, STATE_INITS
from mcserve.server.errors import ConfigError, ModelLoadError
from mcserve.server.model.config import ROUTERS
from mcserve.server.model.dtypes import DTYPE_NAMES
from mcserve.server.settings import ApiSettings

PRESETS = ("tiny", "small", "370m", "1.3b")
DTYPES = ("auto", *DTYPE_NAMES)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> int | float:
    """'4GiB' / '512MB' / '1073741824' -> bytes (int); '0.3' -> a fraction of device memory (float)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 4GiB, 512MB or a fraction like 0.3, got {text!r}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if not unit and number < 1:
        return number
    if number <= 0:
        raise argparse.ArgumentTypeError(f"memory must be positive, got {text!r}")
    return int(number * _UNITS[unit])


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcserve",
        description="OpenAI-compatible server for recurrent LMs with Memory Caching (Gated DeltaNet + SSC).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    serve.add_argument(
        "model_dir", nargs="?", default=None, help="checkpoint directory (default: the model embedded in the package)"
    )
    http = serve.add_argument_group("HTTP (defaults from MCSERVE_* environment variables)")
    http.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    http.add_argument("--port", type=int, help="port (default 8000)")
    http.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (repeat for several keys; also MCSERVE_API_KEY(S))",
    )
    http.add_argument(
        "--api-key-file", metavar="FILE", help="API keys, one a line ('#' comments; MCSERVE_API_KEY_FILE)"
    )
    http.add_argument(
        "--allowed-origins",
        action="append",
        metavar="ORIGIN",
        help="answer CORS for these browser origins, e.g. https://app.example (repeat or comma-separate; default: "
        "no CORS headers)",
    )
    http.add_argument(
        "--log-requests",
        action="store_const",
        const=True,
        help="log prompts and completions (default: no request or response text in the logs)",
    )
    http.add_argument("--served-model-name", help="the name clients pass as 'model' (default: the directory name)")
    http.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 8 MiB)")
    http.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    http.add_argument("--tool-call-parser", choices=("hermes", "none"),
                      help="the model's tool-call syntax (default: tokenizer_config.json's, else hermes)")
    http.add_argument(
        "--default-max-tokens", type=int, help="output cap of a request without max_tokens (default 1024)"
    )
    http.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="after SIGTERM, how long in-flight requests may finish before they are cut (default 30)",
    )
    http.add_argument(
        "--session-dir",
        metavar="DIR",
        help="save named sessions here and restore them after a restart (MCSERVE_SESSION_DIR; default: in memory only)",
    )
    http.add_argument(
        "--session-save-interval",
        type=float,
        dest="session_save_interval_s",
        metavar="SECONDS",
        help="how often sessions that changed are saved (default 60; 0: on request and at shutdown only)",
    )
    eng = serve.add_argument_group("engine (default: the engine's own)")
    eng.add_argument("--max-num-seqs", type=int, help="running sequences at most")
    eng.add_argument("--max-model-len", type=int, help="context length (prompt + output) in tokens")
    eng.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    eng.add_argument("--max-waiting", type=int, help="waiting-queue bound; beyond it requests get 503")
    eng.add_argument("--mc-aggregation", choices=AGGREGATIONS, help="override the checkpoint's MC aggregation")
    eng.add_argument("--mc-top-k", type=int, help="SSC's top-k (checkpoints read per token)")
    eng.add_argument(
        "--state-memory",
        type=parse_memory,
        help="memory for online states and checkpoints: a size (4GiB) or a fraction (0.3)",
    )
    eng.add_argument(
        "--checkpoint-memory",
        type=parse_memory,
        help="the checkpoint pool alone (then --state-memory is for the state slots only)",
    )
    eng.add_argument(
        "--host-checkpoint-memory",
        type=parse_memory,
        help="pinned host memory that evicted checkpoints are offloaded to (default none)",
    )
    eng.add_argument("--dtype", choices=DTYPES, help="model weights (auto: bf16 on CUDA, fp32 on CPU)")
    eng.add_argument("--ckpt-dtype", choices=DTYPES, help="checkpoint pool (auto: bf16 on CUDA, fp32 on CPU)")
    eng.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    eng.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_const",
        const=False,
        help="do not reuse checkpoints across requests",
    )
    eng.add_argument(
        "--seed",
        type=int,
        help="seed of the engine's generator, which samples requests that give no seed (their tokens then also "
        "depend on what else is batched); a request's own seed draws the same noise in any batch",
    )
    eng.add_argument("--enforce-eager", action="store_const", const=True,
                     help="no CUDA graphs for the decode step (each step launched op by op)")
    overlap = eng.add_mutually_exclusive_group()
    overlap.add_argument("--async-scheduling", action="store_const", const=True,
                         help="launch each steady decode step before the previous one's outputs are processed, so "
                         "the GPU does not wait for the host's bookkeeping (default: on where the CUDA runner serves a "
                         "CUDA device; off on CPU and with tensor parallelism; docs/RUNNER.md)")
    overlap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_const", const=False,
                         help="run each engine step to its end before the next is planned")
    eng.add_argument("--decode-matmul", choices=("auto", "cublas"),
                     help="the CUDA decode step's matmuls: auto (default) = per matmul and batch size the faster of "
                     "cuBLAS and the project's Triton matmul as measured on this card (kernels/configs/matmul_*.json; "
                     "cuBLAS on cards never measured), cublas = always cuBLAS")
    eng.add_argument("--cuda-graph-sizes", type=parse_sizes,
                     help="batch sizes to capture decode CUDA graphs for, e.g. 1,8,64 (default 1, 2, 4, 8, 16, "
                     "then multiples of 16 up to --max-num-seqs)")
    eng.add_argument(
        "--tensor-parallel-size",
        type=int,
        help="shard the model by head over this many devices, one process each (default 1; memory budgets are "
        "then per device; docs/PARALLELISM.md)",
    )
    eng.add_argument(
        "--threads",
        type=int,
        help="CPU threads of the engine (MCSERVE_THREADS; default: the CPU allowance (affinity, cgroup quota) less "
        "one core for the HTTP side)",
    )
    eng.add_argument(
        "--slow-step-s", type=float, help="report engine steps longer than this on /health and /metrics (default 10)"
    )

    init = sub.add_parser("init-model", help="write a randomly initialised checkpoint directory")
    init.add_argument("out_dir")
    init.add_argument("--preset", choices=PRESETS, default="tiny")
    init.add_argument("--mc-aggregation", choices=AGGREGATIONS)
    init.add_argument("--top-k", type=int)
    init.add_argument("--segment-size", type=int)
    init.add_argument("--state-init", choices=STATE_INITS)
    init.add_argument("--router", choices=ROUTERS)
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    init.add_argument("--vocab-size", type=int)
    return parser


# Keyword arguments of `AsyncEngine.from_model_dir` (server/engine/args.py's EngineArgs).
ENGINE_FLAGS = (
    "max_num_seqs",
    "max_model_len",
    "max_num_batched_tokens",
    "max_waiting",
    "mc_aggregation",
    "mc_top_k",
    "state_memory",
    "checkpoint_memory",
    "host_checkpoint_memory",
    "dtype",
    "ckpt_dtype",
    "device",
    "enable_prefix_caching",
    "seed",
    "enforce_eager",
    "async_scheduling",
    "decode_matmul",
    "cuda_graph_sizes",
    "tensor_parallel_size",
)


def engine_kwargs(args: argparse.Namespace, settings: ApiSettings) -> dict[str, Any]:
    """The engine flags the user set (the engine's defaults apply to the rest), and the served name."""
    kwargs = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    if settings.served_model_name is not None:
        kwargs["served_model_name"] = settings.served_model_name
    if settings.threads is not None:
        kwargs["threads"] = settings.threads
    kwargs["slow_step_s"] = settings.slow_step_s
    if settings.session_dir is not None:
        kwargs["session_dir"] = settings.session_dir
        kwargs["session_save_interval_s"] = settings.session_save_interval_s
    return kwargs


def settings_from_args(args: argparse.Namespace, model_dir: Path) -> ApiSettings:
    origins = [o.strip() for item in args.allowed_origins or () for o in item.split(",") if o.strip()]
    return ApiSettings.from_env(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_keys) if args.api_keys else None,
        api_key_file=args.api_key_file,
        served_model_name=args.served_model_name or model_dir.resolve().name,
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
        allowed_origins=tuple(origins) if origins else None,
        log_requests=args.log_requests,
        threads=args.threads,
        slow_step_s=args.slow_step_s,
        tool_call_parser=args.tool_call_parser,
        default_max_tokens=args.default_max_tokens,
        drain_timeout=args.drain_timeout,
        session_dir=args.session_dir,
        session_save_interval_s=args.session_save_interval_s,
    )


def load_engine(model_dir: Path, kwargs: dict[str, Any], metrics: Any) -> Any:
    from mcserve.server.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_model_dir(model_dir, metrics=metrics, **kwargs)
    # What is loaded now (torch, the model's modules, the tokenizer's tables) lives as long as the
    # server: out of the collector's sight, a full collection, which holds the GIL and so the engine
    # thread, walks only what serving made (~175k objects at start-up took 0.15 s per collection).
    gc.collect()
    gc.freeze()
    return engine


def set_interop_threads() -> None:
    from mcserve.server.engine.cpu_threads import set_interop_threads

    set_interop_threads(1)


def load_tokenizer(model_dir: Path) -> Any:
    from mcserve.server.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


def _say(message: str) -> None:
    print(f"mcserve: {message}", file=sys.stderr, flush=True)


async def serve(
    model_dir: Path,
    kwargs: dict[str, Any],
    settings: ApiSettings,
    *,
    engine_loader: Callable[[Path, dict[str, Any], Any], Any] = load_engine,
    tokenizer_loader: Callable[[Path], Any] = load_tokenizer,
    on_ready: Callable[[Any], None] | None = None,
) -> int:
    """Listen, load, serve until stopped. `on_ready(server)` runs once the model is attached (tests and
    embedders stop the `DrainingServer` via `should_exit`, or drain it). SIGTERM or SIGINT drains, then
    returns 0 (server/shutdown.py). Returns the exit status."""
    import uvicorn

    from mcserve.server.api import build_app
    from mcserve.server.api.deferred_engine import DeferredEngine
    from mcserve.server.metrics import EngineMetrics
    from mcserve.server.shutdown import DrainingServer

    name = settings.served_model_name or model_dir.name
    tokenizer = tokenizer_loader(model_dir)
    metrics = EngineMetrics(name)
    deferred = DeferredEngine(name)
    app = build_app(deferred, tokenizer, settings, metrics)
    # uvicorn's own graceful timeout only covers what the drain left behind (streams it cut are ending).
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        # h11 buffers the request line and headers up to this, then answers a bare 400; above the
        # app's own header limit so that clients get its OpenAI-style 431 instead.
        h11_max_incomplete_event_size=settings.max_header_bytes + 16 * 1024,
    )
    server = DrainingServer(config, app.state.ctx.drain, settings.drain_timeout)
    shown = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown}:{settings.port}"
    if settings.model_notice:
        _say(f"NOTE: {settings.model_notice}")

    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[Any] = loop.create_future()

    def settle(error: BaseException | None, result: Any) -> None:
        if loaded.done():
            return
        if error is not None:
            loaded.set_exception(error)
        else:
            loaded.set_result(result)

    def load() -> None:  # a daemon thread, so Ctrl-C during loading does not wait for it
        try:
            result = engine_loader(model_dir, kwargs, metrics)
        except BaseException as e:  # handed to the event loop, which reports it
            loop.call_soon_threadsafe(settle, e, None)
        else:
            loop.call_soon_threadsafe(settle, None, result)

    started = time.monotonic()
    serving = asyncio.ensure_future(server.serve())
    _say(f"loading {model_dir} (listening on {url}; /health answers 503 until the model is ready)")
    threading.Thread(target=load, name="mcserve-load", daemon=True).start()
    while not loaded.done() and not serving.done():
        await asyncio.wait({loaded, serving}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done() and not serving.done():
            _say(f"still loading ({time.monotonic() - started:.0f}s)")
    if serving.done():  # stopped (Ctrl-C) or could not bind before the model was loaded
        loaded.cancel()
        return 0 if serving.exception() is None and server.started else 1
    try:
        engine = loaded.result()
    except Exception as e:
        _say(f"could not load {model_dir}: {e}")
        server.should_exit = True
        await serving
        return 1
    deferred.attach(engine)
    _say(
        f"model '{name}' ready in {time.monotonic() - started:.1f}s; "
        f"OpenAI base URL: {url}/v1 (e.g. POST {url}/v1/chat/completions)"
    )
    if on_ready is not None:
        on_ready(server)
    try:
        await serving
    finally:
        shutdown = getattr(engine, "shutdown", None)  # AsyncEngine: stop its loop thread, fail what is left
        if shutdown is not None:
            await asyncio.to_thread(shutdown)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.model_dir is None:
        from mcserve.server.model.default import default_model_dir

        try:
            model_dir = default_model_dir()
        except ModelLoadError as e:
            _say(str(e))
            return 2
    else:
        model_dir = Path(args.model_dir)
        if not model_dir.is_dir():
            _say(f"{model_dir} is not a directory")
            return 2
    try:
        settings = settings_from_args(args, model_dir)
    except ConfigError as e:
        _say(str(e))
        return 2
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_interop_threads()  # before torch runs anything in this process
    try:
        return asyncio.run(serve(model_dir, engine_kwargs(args, settings), settings))
    except KeyboardInterrupt:  # Ctrl-C before the server installed its signal handlers (loading the tokenizer)
        return 130


def _cmd_init_model(args: argparse.Namespace) -> int:
    from mcserve.server.model.init_model import init_model

    mc = dict(
        aggregation=args.mc_aggregation,
        top_k=args.top_k,
        segment_size=args.segment_size,
        state_init=args.state_init,
        router=args.router,
    )
    extra = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
    init_model(
        args.out_dir, preset=args.preset, mc={k: v for k, v in mc.items() if v is not None}, seed=args.seed, **extra
    )
    _say(f"wrote a random '{args.preset}' model to {args.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _cmd_serve(args)
    return _cmd_init_model(args)


if __name__ == "__main__":
    raise SystemExit(main())
