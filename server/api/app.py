"""The FastAPI application: routes, error handlers and middleware around one engine."""

from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from mcserve.server.api.errors import install_error_handlers
from mcserve.server.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, ErrorGuardMiddleware
from mcserve.server.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mcserve.server.api.serving import ServingContext, parse_body
from mcserve.server.api.serving_chat import create_chat_completion
from mcserve.server.api.serving_completion import create_completion
from mcserve.server.engine.client import EngineClient
from mcserve.server.errors import InvalidRequestError, NotFoundError
from mcserve.server.metrics import EngineMetrics
from mcserve.server.settings import ApiSettings
from mcserve.server.text.chat import ChatTokenizer, chat_prompt_ids


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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

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

    @app.get("/health")
    async def health() -> Response:
        ready = engine.is_ready
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        if engine.is_ready:
            ctx.metrics.set_stats(engine.stats())
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": package_version()})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await parse_body(request, TokenizeRequest)
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            if not body.messages:
                raise InvalidRequestError("messages must not be empty", param="messages")
            ids = chat_prompt_ids(
                tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt is not False
            )
        else:
            ids = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens is not False)
        out = TokenizeResponse(tokens=list(ids), count=len(ids), max_model_len=engine.max_model_len)
        return JSONResponse(out.model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await parse_body(request, DetokenizeRequest)
        ctx.check_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        return JSONResponse(DetokenizeResponse(prompt=tokenizer.decode(body.tokens)).model_dump(mode="json"))

    # Added last = outermost: the guard sees everything, the key is checked before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys)
    app.add_middleware(ErrorGuardMiddleware)
    return app
