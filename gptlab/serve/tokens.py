"""vLLM's tokenizer endpoints: /tokenize, /detokenize and /tokenizer_info (what lm-evaluation-harness's
remote tokenizer asks for when it scores a running server)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request as HTTPRequest

from gptlab.serve.protocol import APIError, chat_messages, chat_render_options, completion_prompts
from gptlab.tokenizer.base import EOT


def add_token_routes(app: FastAPI, srv) -> None:
    """`srv`: the app's Server (gptlab.serve.app)."""
    async def read(request: HTTPRequest) -> dict:  # a key if the server has keys, a loaded model, a JSON body
        srv.authorize(request)
        srv.ready()
        body = await srv.body(request)
        srv.check_model(body, required=False)
        return body

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await read(request)
        if "messages" in body:
            ids = await asyncio.to_thread(srv.chat_ids, chat_messages(body), *chat_render_options(body))
        elif isinstance(body.get("prompt"), str) and body["prompt"] in srv.tok.special_tokens:
            ids = [srv.tok.special_tokens[body["prompt"]]]  # a special token asked by name (lm-eval's eos id)
        else:  # text stays text, as completions encode it
            ids = (await asyncio.to_thread(completion_prompts, body, srv.tok, srv.tok.vocab_size))[0][0]
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.ctx}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: HTTPRequest):
        """vLLM's: what lm-evaluation-harness's remote tokenizer asks (its /tokenize and /detokenize are above)."""
        srv.authorize(request)
        srv.ready()
        return {"tokenizer_class": type(srv.tok).__name__, "eos_token": EOT, "bos_token": None, "pad_token": None,
                "model_max_length": srv.ctx, "vocab_size": srv.tok.vocab_size}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        ids = (await read(request)).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        if any(not 0 <= t < srv.tok.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in 0..{srv.tok.vocab_size - 1}", param="tokens")
        return {"prompt": srv.tok.decode(ids)}
