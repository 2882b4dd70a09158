"""Engine output -> OpenAI response objects and stream chunks (completions and chat completions)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from fastapi.responses import PlainTextResponse

from gptlab.chat.tools import CallStream, parse_calls
from gptlab.serve.engine import DONE, Delta, Request
from gptlab.serve.protocol import APIError
from gptlab.serve.media import audio_bytes, audio_message, b64, image_part


def _token_str(tok, t: int) -> str:
    return tok.decode_bytes([t]).decode("utf-8", errors="replace")


def usage(req: Request) -> dict:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
            "total_tokens": req.prompt_tokens + req.completion_tokens}


def completion_logprobs(tok, entries: list, base: int = 0) -> dict:
    """Legacy completions format: parallel lists; text offsets count from the start of the choice's text,
    which begins with the `base` characters of an echoed prompt."""
    return {"tokens": [_token_str(tok, t) for t, *_ in entries],
            "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": [None if top is None else {_token_str(tok, i): v for i, v in top}
                             for _, _, top, _ in entries],
            "text_offset": [base + off for *_, off in entries]}


def chat_logprobs(tok, entries: list) -> dict:
    def item(t, lp):
        b = tok.decode_bytes([t])
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top, _ in entries],
            "refusal": None}


class Formatter:
    """Builds the bodies for one request; `kind` is "completion" or "chat"."""

    def __init__(self, req: Request, tok, model: str):
        self.req, self.tok, self.model = req, tok, model
        self.chat = req.spec.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + req.id
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        n = len(req.spec.prompts) * req.spec.n
        self.texts = [""] * n
        self.entries: list[list] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.audio_format = req.spec.audio_format  # an omni reply with speech
        self.waves: list[list] = [[] for _ in range(n)]
        self.images: list[list] = [[] for _ in range(n)]
        self.audio_ids = ["audio_" + req.id + f"_{i}" for i in range(n)]
        self.calls = [CallStream() for _ in range(n)] if self.chat and req.spec.tools else None

    def prompt_text(self, index: int) -> str:
        return self.req.spec.prompt_texts[index // self.req.spec.n] if self.req.spec.echo else ""

    def echoed(self, index: int) -> list:
        """The echoed prompt's logprob entries (completions with echo and logprobs), else []."""
        return self.req.prompt_logprobs[index // self.req.spec.n] if self.req.prompt_logprobs else []

    def _completion_logprobs(self, index: int, entries: list, with_prompt: bool) -> dict:
        base = len(self.prompt_text(index))
        return completion_logprobs(self.tok, (self.echoed(index) if with_prompt else [])
                                   + [(t, lp, top, base + off) for t, lp, top, off in entries])

    # --- whole responses -----------------------------------------------------------------------
    def add(self, d: Delta) -> None:
        self.texts[d.index] += d.text
        for part in d.media:
            (self.waves if part["type"] == "audio" else self.images)[d.index].append(part[part["type"]])
        self.entries[d.index] += d.logprobs
        if d.finish_reason:
            self.finish[d.index] = d.finish_reason
        if d.withhold:  # the moderation classifier flagged the whole choice
            self.texts[d.index], self.entries[d.index] = "", []

    def response(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            reason = self.finish[i]
            lp = None
            if self.req.spec.logprobs is not None:
                lp = (chat_logprobs(self.tok, self.entries[i]) if self.chat else
                      self._completion_logprobs(i, self.entries[i], with_prompt=True))
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                if self.calls is not None:  # the reply's <tool_call> blocks become tool_calls
                    content, calls = parse_calls(text)
                    if calls:
                        message.update(content=content or None, tool_calls=calls)
                        reason = "tool_calls" if reason == "stop" else reason
                if self.audio_format:  # OpenAI's shape: the words are the audio's transcript, content is null
                    message.update(content=None, audio=audio_message(self.waves[i], text, self.audio_format))
                if self.images[i]:
                    message["images"] = [image_part(im) for im in self.images[i]]
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": self.prompt_text(i) + text, "logprobs": lp,
                                "finish_reason": reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.req), "system_fingerprint": None}

    # --- stream chunks -------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if self.req.spec.include_usage:  # None until the last chunk, or the usage so far (vLLM's continuous)
            body["usage"] = usage(self.req) if usage_ is None and self.req.spec.continuous_usage else usage_
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def opening(self) -> list[str]:
        """Chat: the role delta of each choice; completions with echo: the prompt text."""
        n = len(self.texts)
        if self.chat:
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(n)]
        return [self._chunk([{"index": i, "text": self.prompt_text(i), "finish_reason": None,
                              "logprobs": self._completion_logprobs(i, [], True) if self.echoed(i) else None}])
                for i in range(n) if self.prompt_text(i)]

    def chunk(self, d: Delta) -> str:
        lp = None
        if self.req.spec.logprobs is not None and d.logprobs:
            lp = (chat_logprobs(self.tok, d.logprobs) if self.chat else
                  self._completion_logprobs(d.index, d.logprobs, with_prompt=False))
        if self.chat:
            reason, text = d.finish_reason, d.text
            delta = {}
            if self.calls is not None:  # text streams until a call opens; each call comes whole when it closes
                stream = self.calls[d.index]
                text, calls = stream.feed(d.text, final=reason is not None)
                if calls:
                    delta["tool_calls"] = calls
                if reason == "stop" and stream.calls:
                    reason = "tool_calls"
            if text or not (reason or delta):
                delta = {"content": text, **delta}
            if self.audio_format:  # text streams as the transcript, speech as base64 chunks
                audio = {"id": self.audio_ids[d.index]}
                if d.text:
                    audio["transcript"] = d.text
                waves = [p["audio"] for p in d.media if p["type"] == "audio"]
                if waves:
                    audio["data"] = b64(audio_bytes(np.concatenate(waves), self.audio_format))
                delta = {"audio": audio} if len(audio) > 1 else {}
            images = [image_part(p["image"]) for p in d.media if p["type"] == "image"]
            if images:
                delta["images"] = images
            return self._chunk([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
        return self._chunk([{"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}])

    def usage_chunk(self) -> str:
        return self._chunk([], usage(self.req))


async def collect(req, fmt: Formatter, request):
    """A non-streamed response: the deltas gathered until done; a client that went away ends it (499)."""
    checked = time.monotonic()
    while True:
        item = None
        try:
            item = await asyncio.wait_for(req.queue.get(), 0.25)
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - checked >= 0.25:  # deltas may arrive faster than that: check by time
            checked = time.monotonic()
            if await request.is_disconnected():
                return PlainTextResponse("", status_code=499)
        if item is None:
            continue
        if item is DONE:
            return fmt.response()
        if isinstance(item, APIError):
            raise item
        for d in item:
            fmt.add(d)


async def sse(req, fmt: Formatter):
    """Server-sent events: opening chunks, one chunk per delta, the usage chunk if asked, [DONE]."""
    wait = req.spec.echo and req.spec.logprobs is not None  # the echoed prompt's logprobs come with the prefill
    for c in [] if wait else fmt.opening():
        yield c
    while True:
        item = await req.queue.get()
        if wait:
            wait = False
            for c in fmt.opening():
                yield c
        if item is DONE:
            break
        if isinstance(item, APIError):
            yield f"data: {json.dumps(item.body())}\n\n"
            break
        for d in item:
            yield fmt.chunk(d)
    if req.spec.include_usage:
        yield fmt.usage_chunk()
    yield "data: [DONE]\n\n"
