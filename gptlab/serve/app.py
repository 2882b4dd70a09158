"""The FastAPI app: OpenAI-compatible routes over one continuous-batching engine.

The model loads in a background thread after startup, so /health answers at once (503 "loading",
then 200). Every error is OpenAI-shaped. A streamed request whose client leaves is cancelled in
the engine; so is a non-streamed one (its handler polls for the disconnect while it waits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptlab import __version__
from gptlab.chat.jinja import JinjaChat, read_hf_template
from gptlab.chat.template import CHAT_TOKENS, content_text, render_ids
from gptlab.errors import GptlabError
from gptlab.generate.constrain import ll_tokenizer
from gptlab.runtime import INFER_DTYPES, canonical_dtype
from gptlab.serve.embeddings import add_embedding_routes
from gptlab.serve.engine import Engine
from gptlab.serve.metrics import Metrics
from gptlab.serve.moderation import Moderator
from gptlab.serve.prefix import PrefixCache
from gptlab.serve.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, APIError, chat_messages, chat_render_options,
                                   check_fields, completion_prompts, error_body, parse_json, parse_request)
from gptlab.serve.media import model_modalities, output_modalities
from gptlab.serve.responses import Formatter, collect, sse
from gptlab.serve.schemas import ChatCompletionRequest, CompletionRequest, body_doc
from gptlab.serve.structured import parse_tools, request_grammar
from gptlab.serve.tokens import add_token_routes

log = logging.getLogger("gptlab.serve")
DEFAULT_MAX_BODY = 2 << 20  # 2 MiB: far more than any context window's worth of text


def api_keys_from_env(keys=()) -> tuple[str, ...]:
    env = os.environ.get("GPTLAB_API_KEYS", "")
    return tuple(k for k in (*keys, *(x.strip() for x in env.split(","))) if k)


class Server:
    """Loading state, the engine, and the shared helpers of the routes."""

    def __init__(self, run_dir, api_keys, max_batch, max_queue, moderation, dtype, device, model_name,
                 max_body_bytes, moderation_action, moderation_label, moderation_threshold, prefix_cache_mb=0,
                 draft=None, speculative_tokens=4, chat_template=None, lora=()):
        self.run_dir = Path(run_dir)
        self.model_name = model_name or self.run_dir.resolve().name
        self.keys = [k.encode() for k in api_keys_from_env(api_keys)]
        self.max_batch, self.max_queue, self.max_body = max_batch, max_queue, max_body_bytes
        # None: the weights' dtype; a name ('auto', 'bf16', ...) is resolved when the model loads
        self.dtype = canonical_dtype(dtype, INFER_DTYPES) if isinstance(dtype, str) else dtype
        self.device, self.moderation = device, moderation
        self.mod_opts = (moderation_action, moderation_label, moderation_threshold)
        self.prefix_cache_mb, self.draft, self.speculative_tokens = prefix_cache_mb, draft, speculative_tokens
        self.chat_template, self.jinja = chat_template, None  # a Jinja template given, or the run's own
        self.lora, self.adapters = list(lora), None  # [(name, dir)] served over the base; the AdapterBank
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.moderator: Moderator | None = None
        self.status, self.error = "loading", None
        self.created = int(time.time())

    def load(self) -> None:
        try:
            from gptlab.generate.generator import Generator
            from gptlab.run import load_run

            t0 = time.perf_counter()
            m = self.moderation
            if m is not None and not isinstance(m, Moderator):
                m = Moderator.from_paths(m, *self.mod_opts)
            self.moderator = m
            run = load_run(self.run_dir, self.device)
            if self.lora:  # before the generator converts the dtype: the stacked adapters convert with it
                from gptlab.serve.adapters import install_adapters

                self.adapters = install_adapters(run.model, self.lora)
            self.tok, self.ctx = run.tokenizer, run.model.cfg.block_size
            self.chat_ok = all(t in self.tok.special_tokens for t in CHAT_TOKENS)
            self.chat_stop_ids = tuple(self.tok.special_tokens[t] for t in CHAT_TOKENS) if self.chat_ok else ()
            source = self.chat_template or (None if self.chat_ok else read_hf_template(self.run_dir))
            if source is not None:  # an HF model's template: a reply ends at any special token (its end of turn)
                self.jinja = JinjaChat(source, self.tok)
                self.chat_ok, self.chat_stop_ids = True, tuple(sorted(self.tok.special_tokens.values()))
            gen = Generator(run.model, run.tokenizer, self.dtype, rows=min(self.max_batch, 8))
            try:  # the vocabulary's token trie for structured output, built now rather than in the first request
                ll_tokenizer(self.tok)
            except GptlabError as e:
                log.info("%s", e)
            prefix = PrefixCache(max_bytes=self.prefix_cache_mb << 20) if self.prefix_cache_mb > 0 else None
            spec = self._speculator(run) if self.draft else None
            self.engine = Engine(gen, self.metrics, self.max_batch, self.max_queue, self.moderator, prefix=prefix,
                                 spec=spec, adapters=self.adapters)
            self.engine.start()
            self.status = "ready"
            log.info("loaded %s (%s, context %d) in %.1f s", self.run_dir, self.model_name, self.ctx,
                     time.perf_counter() - t0)
        except Exception as e:  # /health reports it; the process stays up to say why
            self.status, self.error = "failed", f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", self.run_dir, self.error)

    def _speculator(self, run):
        from gptlab.generate.generator import Generator
        from gptlab.run import load_run
        from gptlab.serve.speculative import Speculator

        draft = load_run(self.draft, self.device)
        if draft.tokenizer.to_dict() != run.tokenizer.to_dict():
            raise GptlabError(f"the draft run {self.draft} has a different tokenizer from the served model")
        if draft.model.cfg.block_size < run.model.cfg.block_size:
            raise GptlabError(f"the draft run's context ({draft.model.cfg.block_size}) is shorter than the model's")
        log.info("speculative decoding: draft %s (%.1fM params), %d tokens a round", self.draft,
                 draft.model.num_params() / 1e6, self.speculative_tokens)
        # the draft's own fastest dtype for one-row steps (its shapes are not the model's)
        return Speculator(Generator(draft.model, draft.tokenizer, "auto", rows=1), self.speculative_tokens)

    # --- request helpers -----------------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        if not self.keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for k in self.keys:  # constant time per key, and every key is compared
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def ready(self) -> None:
        if self.status != "ready":
            raise APIError(503, f"model is {self.status}" + (f": {self.error}" if self.error else ""),
                           code="model_not_ready", headers={"Retry-After": "5"})

    async def body(self, request: HTTPRequest) -> dict:
        # A web page may POST text/plain (or a form) to any origin without a CORS preflight; demanding JSON
        # makes every browser ask first, and without --cors-origin the answer is no.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                           code="unsupported_media_type")
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > 8 * self.max_body:
            raise APIError(413, f"request body too large (limit {self.max_body} bytes)", code="body_too_large")
        chunks, n, over = [], 0, False
        async for c in request.stream():  # drain past the limit (up to 8x) so the client sees the 413
            n += len(c)
            over = over or n > self.max_body
            if n > 8 * self.max_body:
                break
            if not over:
                chunks.append(c)
        if over:
            raise APIError(413, f"request body too large (limit {self.max_body} bytes)", code="body_too_large")
        return parse_json(b"".join(chunks))

    def check_model(self, body: dict, required: bool = True) -> int:
        """The request's model -> 0 (the base) or the index of the LoRA adapter it names; else a 404."""
        model = body.get("model")
        if model is None and not required:
            return 0
        if not isinstance(model, str) or model == self.model_name:
            return 0
        k = next((i for i, (name, _) in enumerate(self.lora, start=1) if name == model), None)
        if k is None:
            served = ", ".join(f"'{n}'" for n in [self.model_name, *(n for n, _ in self.lora)])
            raise APIError(404, f"The model '{model}' does not exist (this server serves {served})",
                           param="model", code="model_not_found")
        return k

    def chat_ids(self, msgs: list[dict], generation_prompt: bool = True, continue_final: bool = False,
                 tools: list[dict] | None = None) -> list[int]:
        if not self.chat_ok:
            raise APIError(400, f"model '{self.model_name}' has no chat template tokens; it cannot serve chat "
                                "completions (use /v1/completions, or fine-tune it with the chat tokens)",
                           code="chat_not_supported")
        try:
            if self.jinja is not None:
                return self.jinja.render_ids(msgs, generation_prompt, continue_final, tools)
            return render_ids(self.tok, msgs, generation_prompt, continue_final, tools)[0]  # content is plain text
        except GptlabError as e:
            raise APIError(400, str(e), param="messages") from None

    async def moderate_input(self, texts: list[str]) -> None:
        if self.moderator is None:
            return
        hit = await asyncio.to_thread(self.moderator.check_input, texts)
        if hit:
            self.metrics.count_moderation("input", "refuse", hit.source)
            log.warning("moderation: refused a request (%s: %r)", hit.source, hit.detail)
            raise APIError(400, "the request was refused by this server's content filter", code="content_filter")


class CancellingStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (done, client gone, server stopping)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


ENDPOINTS = {"/", "/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/v1/models/{model}",
             "/v1/completions", "/v1/chat/completions"}


class StatusCounter:
    """ASGI middleware counting responses per endpoint and status (no BaseHTTPMiddleware: it breaks
    streaming disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                path = scope.get("path", "")
                if path.startswith("/v1/models/"):
                    path = "/v1/models/{model}"
                # fixed labels only: a label per client-chosen path would grow without bound (and the path is
                # percent-decoded, so it could carry quotes and newlines into the exposition text)
                self.metrics.count_request(path if path in ENDPOINTS else "other", message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(run_dir, *, api_keys=(), max_batch: int = 32, max_queue: int = 64, moderation=None, dtype=None,
               device: str = "cpu", model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               moderation_action: str = "redact", moderation_label: str | None = None,
               moderation_threshold: float = 0.5, cors_origins: tuple[str, ...] = (),
               prefix_cache_mb: int = 1024, draft=None, speculative_tokens: int = 4,
               chat_template: str | None = None, lora: list[tuple[str, str]] | None = None) -> FastAPI:
    """The server app for a run directory. `moderation`: None, a Moderator, or blocklist file / classifier
    run-dir path(s). API keys: `api_keys` plus the comma-separated GPTLAB_API_KEYS variable. `cors_origins`:
    web origins whose pages may call the API from a browser (none by default). `prefix_cache_mb`: memory for
    reused prompt-prefix KV (0: off). `draft`: a smaller run with the same tokenizer that drafts
    `speculative_tokens` tokens a round for speculative decoding. `chat_template`: a Jinja chat template (its
    text, or a file holding it) used instead of gptlab's; by default a run without gptlab's chat tokens uses
    the template it was imported with (chat_template.jinja), if any. `lora`: [(name, adapter dir)] served over
    the run, each chosen by a request's `model` field, rows of different adapters in one batch."""
    if max_batch < 1 or max_queue < 1:
        raise GptlabError("max_batch and max_queue must be ≥ 1")
    if not 1 <= speculative_tokens <= 16:
        raise GptlabError("speculative_tokens must be in 1..16")
    if chat_template is not None and "{" not in chat_template:  # a path, as vLLM's --chat-template takes
        if not Path(chat_template).is_file():
            raise GptlabError(f"chat template file not found: {chat_template}")
        chat_template = Path(chat_template).read_text(encoding="utf-8")
    if chat_template is not None:
        JinjaChat(chat_template, None)  # a template that does not parse is a one-line error now
    if draft is not None:
        from gptlab.run import read_run_config

        read_run_config(draft)  # a wrong path is a one-line error now, not a failed background load
    lora = list(lora or ())
    if lora:  # an unreadable adapter is a one-line error now, not a failed background load
        from gptlab.serve.adapters import check_adapters

        check_adapters(lora)
    srv = Server(run_dir, api_keys, max_batch, max_queue, moderation, dtype, device, model_name, max_body_bytes,
                 moderation_action, moderation_label, moderation_threshold, prefix_cache_mb, draft,
                 speculative_tokens, chat_template, lora)

    async def lifespan(app):
        threading.Thread(target=srv.load, name="gptlab-load", daemon=True).start()
        yield
        if srv.engine is not None:
            srv.engine.stop()

    app = FastAPI(title="gptlab", version=__version__, lifespan=lifespan, redoc_url=None)  # /docs, /openapi.json
    app.state.server = srv
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(StatusCounter, metrics=srv.metrics)
    for add_routes in (_error_handlers, _info_routes, _generation_routes, add_token_routes, add_embedding_routes):
        add_routes(app, srv)
    return app


def _error_handlers(app: FastAPI, srv: Server) -> None:
    """Every error is OpenAI-shaped JSON: our APIErrors, Starlette's (404, 405), and crashes (500, logged)."""
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)


def _info_routes(app: FastAPI, srv: Server) -> None:
    """The chat page, /health, /metrics and the model list."""
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(resources.files("gptlab.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/health")
    async def health():
        body = {"status": srv.status, "model": srv.model_name}
        if srv.error:
            body["error"] = srv.error
        return JSONResponse(body, status_code=200 if srv.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "gptlab",
                "max_model_len": getattr(srv, "ctx", None),
                "modalities": sorted(model_modalities(srv.tok)) if getattr(srv, "tok", None) else ["text"]}

    def adapter_card(name: str) -> dict:  # as vLLM lists its LoRA modules: the base they adapt is the parent
        return {**model_card(), "id": name, "parent": srv.model_name}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        srv.authorize(request)
        return {"object": "list", "data": [model_card(), *(adapter_card(n) for n, _ in srv.lora)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        srv.authorize(request)
        k = srv.check_model({"model": model_id})
        return adapter_card(model_id) if k else model_card()


def _generation_routes(app: FastAPI, srv: Server) -> None:
    @app.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    async def completions(request: HTTPRequest):
        return await _generate(srv, request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(request: HTTPRequest):
        return await _generate(srv, request, "chat")


async def _generate(srv: Server, request: HTTPRequest, kind: str):
    """A completion or chat request: parsed and tokenized off the event loop, moderated, submitted to the
    engine, then streamed (SSE) or collected into one response."""
    srv.authorize(request)
    srv.ready()
    body = await srv.body(request)
    adapter = srv.check_model(body)
    tools = None
    if kind == "chat":
        check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
        tools = parse_tools(body)

        def encode(b):
            msgs = chat_messages(b, srv.tok)
            # a reply ends at <|end|> or at any role token (a model that starts a new turn has finished
            # its own), as in `gptlab chat` and the pipeline
            ids = srv.chat_ids(msgs, *chat_render_options(b), tools=tools.functions if tools else None)
            return [ids], [content_text(m.get("content") or "") for m in msgs], srv.chat_stop_ids
    else:
        check_fields(body, COMPLETION_FIELDS, "/v1/completions")

        def encode(b):
            return (*completion_prompts(b, srv.tok, srv.tok.vocab_size), ())
    # tokenizing up to max_body bytes takes a while: off the event loop, so other streams keep flowing
    spec = await asyncio.to_thread(parse_request, body, kind, encode, srv.ctx, srv.max_batch, srv.tok.vocab_size)
    spec.grammar = await asyncio.to_thread(request_grammar, body, tools)  # a large schema compiles for a while
    spec.tools = tools if tools is not None and tools.choice != "none" else None
    spec.adapter = adapter
    if kind == "chat":  # the media the reply may hold: the grammar allows exactly those spans
        media, spec.audio_format = output_modalities(body, srv.tok)
        spec.params = dataclasses.replace(spec.params, modalities=("text", *media))
    if spec.logprobs is not None and srv.moderator is not None and srv.moderator.pattern is not None:
        # logprobs carry every sampled token's text, so they would show what the blocklist redacts
        raise APIError(400, "logprobs are not available on this server: its output filter redacts text that "
                            "token logprobs would show", param="logprobs", code="logprobs_not_supported")
    await srv.moderate_input(spec.prompt_texts)
    req = srv.engine.submit(spec, asyncio.get_running_loop())
    fmt = Formatter(req, srv.tok, body["model"] if adapter else srv.model_name)
    if spec.stream:
        return CancellingStream(sse(req, fmt), lambda: srv.engine.cancel(req), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await collect(req, fmt, request)
    finally:
        srv.engine.cancel(req)  # no-op once finished
