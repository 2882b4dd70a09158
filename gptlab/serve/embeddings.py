"""OpenAI's /v1/embeddings: one vector per input, from the served model's trunk.

Pooling: the mean of the final (post-ln_f) hidden states over the input's tokens, L2-normalised as OpenAI's
embeddings are (so a dot product is a cosine similarity). A causal decoder's last token has seen the whole
input too, but its state is shaped for predicting the next token; the mean is the common choice for a model
not trained for embeddings. Inputs run one at a time beside the decode loop (no KV cache, no shared state).
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import torch
from fastapi import FastAPI, Request as HTTPRequest

from gptlab.serve.protocol import APIError, _text, check_fields
from gptlab.serve.schemas import EmbeddingRequest, body_doc

FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_INPUTS = 2048  # as OpenAI


def embedding_inputs(body: dict, tok, ctx: int) -> list[list[int]]:
    """`input`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    x = body.get("input")
    if isinstance(x, str) or (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)):
        x = [x]
    if not isinstance(x, list) or not x or len(x) > MAX_INPUTS:
        raise APIError(400, f"'input' must be a string or a non-empty list of at most {MAX_INPUTS} strings or token "
                            "lists", param="input")
    out = []
    for item in x:
        if isinstance(item, str):
            ids = tok.encode(_text(item, "input"))
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if any(not 0 <= t < tok.vocab_size for t in item):
                raise APIError(400, f"token ids must be in 0..{tok.vocab_size - 1}", param="input")
            ids = list(item)
        else:
            raise APIError(400, "'input' items must all be strings or token-id lists", param="input")
        if not ids:
            raise APIError(400, "'input' must not contain empty strings", param="input")
        if len(ids) > ctx:
            raise APIError(400, f"an input is {len(ids)} tokens; this model's maximum context length is {ctx}",
                           param="input", code="context_length_exceeded")
        out.append(ids)
    return out


@torch.inference_mode()
def embed(model, inputs: list[list[int]], device, adapters=None, adapter: int = 0) -> np.ndarray:
    """(N, C) float32, each row the L2-normalised mean of its input's final hidden states (under the LoRA
    adapter `adapter` of the bank `adapters`, when given)."""
    if adapters is not None:
        adapters.route([adapter])
    rows = []
    for ids in inputs:
        h = model.hidden(torch.tensor([ids], device=device))[0].float()  # (T, C)
        rows.append(torch.nn.functional.normalize(h.mean(0), dim=0).cpu())
    return torch.stack(rows).numpy()


def add_embedding_routes(app: FastAPI, srv) -> None:
    lock = asyncio.Lock()  # one embedding batch at a time beside the engine: two would only share the cores

    @app.post("/v1/embeddings", openapi_extra=body_doc(EmbeddingRequest))
    async def embeddings(request: HTTPRequest):
        srv.authorize(request)
        srv.ready()
        body = await srv.body(request)
        adapter = srv.check_model(body)
        check_fields(body, FIELDS, "/v1/embeddings")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        width = srv.engine.gen.model.cfg.n_embd
        if body.get("dimensions") not in (None, width):
            raise APIError(400, f"this model's embeddings have {width} dimensions", param="dimensions")
        inputs = await asyncio.to_thread(embedding_inputs, body, srv.tok, srv.ctx)
        async with lock:
            vecs = await asyncio.to_thread(embed, srv.engine.gen.model, inputs, srv.engine.gen.device, srv.adapters,
                                           adapter)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
                for i, v in enumerate(vecs)]
        n = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": body["model"] if adapter else srv.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}
