"""The FastAPI application: routes, error handlers and middleware around one engine."""

from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mcserve.server.api.drain import DrainMiddleware
from mcserve.server.api.errors import install_error_handlers
from mcserve.server.api.health import health_report
from mcserve.server.api.http_metrics import HttpMetricsMiddleware
from mcserve.server.api.limits import check_messages
from mcserve.server.api.middleware import ApiKeyMiddleware, ErrorGuardMiddleware, SizeLimitMiddleware
from mcserve.server.api.openapi import install_openapi
from mcserve.server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mcserve.server.api.request_id import RequestIdMiddleware
from mcserve.server.api.serving import ServingContext, admitted, parse_body
from mcserve.server.api.serving_chat import create_chat_completion
from mcserve.server.api.serving_completion import create_completion
from mcserve.server.api.sessions import install_session_routes
from mcserve.server.engine.client import EngineClient
from mcserve.server.errors import InvalidRequestError, NotFoundError, check_context_length
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from mcserve.server.text.chat import ChatTokenizer


def package_version() -> str:
    try:
        return metadata.version("mcserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_app(
    engine: EngineClient, tokenizer: ChatTokenizer, settings: ApiSettings, metrics: EngineMetrics | None = None
) -> FastAPI:
    """An app serving `engine`. `metrics`: pass the object the engine records into (see
    server/metrics.py); by default a fresh one, with its own registry, is made here."""
    ctx = ServingContext(
        engine, tokenizer, settings, metrics or EngineMetrics(settings.served_model_name or engine.model_name)
    )
    app = FastAPI(title="mcserve", version=package_version(), description="OpenAI-compatible API")
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await admitted(ctx, request, create_chat_completion)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await admitted(ctx, request, create_completion)

    def model_card() -> ModelCard:
        return ModelCard(
            id=ctx.model_name, root=engine.model_name, max_model_len=engine.max_model_len, notice=settings.model_notice
        )

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse(ModelList(data=[model_card()]).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if model_id not in (ctx.model_name, engine.model_name):
            raise NotFoundError(f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card().model_dump(mode="json"))

    install_session_routes(app, ctx)

    @app.get("/health")
    async def health() -> Response:
        body, status = health_report(engine, ctx.drain)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        ctx.metrics.set_ready(health_report(engine, ctx.drain)[1] == 200)
        if engine.is_ready:
            ctx.metrics.set_stats(engine.stats())
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": package_version()})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """The generation endpoints' limits apply, and so does the context bound: a prompt that could
        never be served is refused (the error says how many tokens it has), which bounds the response."""
        ctx.check_ready()
        body = await parse_body(ctx, request, TokenizeRequest)
        check_messages(body.messages)
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            if not body.messages:
                raise InvalidRequestError("messages must not be empty", param="messages")
            ids = await ctx.chat_prompt_ids(
                body.messages, add_generation_prompt=body.add_generation_prompt is not False
            )
        else:
            ids = await ctx.text_prompt_ids(
                body.prompt or "", add_special_tokens=body.add_special_tokens is not False, param="prompt"
            )
        limit = engine.max_model_len
        check_context_length(len(ids), limit, param="messages" if body.messages is not None else "prompt",
                             need_output=False)
        out = TokenizeResponse(tokens=list(ids), count=len(ids), max_model_len=limit)
        return JSONResponse(out.model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        ctx.check_ready()
        body = await parse_body(ctx, request, DetokenizeRequest)
        ctx.check_model(body.model)
        if len(body.tokens) > engine.max_model_len:
            raise InvalidRequestError(
                f"tokens: at most max_model_len={engine.max_model_len} ids, got {len(body.tokens)}",
                param="tokens",
                code="limit_exceeded",
            )
        ctx.check_token_ids(body.tokens, "tokens")
        text = await ctx.text.run(tokenizer.decode, body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))

    # Added last = outermost: requests are counted whoever answers them, the guard sees everything,
    # a draining server turns new requests away, CORS answers preflights (no key on them), the key is
    # checked before the body is read.
    app.add_middleware(
        SizeLimitMiddleware, max_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes
    )
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Session-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(DrainMiddleware, drain=ctx.drain)
    app.add_middleware(ErrorGuardMiddleware)
    routes = [(r.path, r.path_regex) for r in app.routes if isinstance(r, (APIRoute, Route))]
    app.add_middleware(HttpMetricsMiddleware, metrics=ctx.metrics, routes=routes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries the id, a 500 too
    return app
