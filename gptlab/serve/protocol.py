"""OpenAI request bodies -> validated generation requests; OpenAI-shaped errors.

Everything a client sends is checked here, before it reaches the engine: a bad field is a 400 with the
field named in `param`, never an exception inside the decode loop. Fields we do not know are ignored
with a logged warning (what OpenAI-compatible servers do), fields we know but do not support are a 400.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from gptlab.chat.tools import check_calls
from gptlab.errors import GptlabError
from gptlab.generate.params import SamplingParams

log = logging.getLogger("gptlab.serve")

MAX_STOP = 4  # as OpenAI
MAX_N = 16
MAX_LOGPROBS = 5  # completions; chat top_logprobs allows up to 20
MAX_CHAT_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def parse_json(raw: bytes) -> dict:
    """Body bytes -> JSON object; invalid UTF-8, malformed JSON, NaN/Infinity and non-objects are 400s."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"malformed JSON in request body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


# --- typed field readers ------------------------------------------------------------------------------
def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"'{name}' must be a string, got {type(value).__name__}", param=name)
    try:
        value.encode("utf-8")  # JSON \\ud800 escapes decode to lone surrogates, which are not text
    except UnicodeEncodeError:
        raise APIError(400, f"'{name}' contains invalid Unicode (a lone surrogate)", param=name) from None
    return value


def _int(body: dict, name: str, default, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise APIError(400, f"'{name}' must be an integer, got {json.dumps(v)[:40]}", param=name)
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be ≥ {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise APIError(400, f"'{name}' must be ≤ {hi}, got {v}", param=name)
    return v


def _float(body: dict, name: str, default: float, lo=None, hi=None, lo_open=False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)[:40]}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(400, f"'{name}' must be {'>' if lo_open else '≥'} {lo}, got {v}", param=name)
    if hi is not None and v > hi:
        raise APIError(400, f"'{name}' must be ≤ {hi}, got {v}", param=name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {json.dumps(v)[:40]}", param=name)
    return v


# --- the request ----------------------------------------------------------------------------------------
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed",
          "n", "stream", "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
          "user", "ignore_eos", "best_of", "metadata", "store", "service_tier", "parallel_tool_calls",
          "min_tokens", "stop_token_ids", "include_stop_str_in_output",  # vLLM's
          "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "guided_decoding_backend", "structured_outputs"}  # gptlab.serve.structured
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "modalities", "reasoning_effort", "audio", "add_generation_prompt", "continue_final_message"}
# vLLM's fields that this server knows but does not do: a 400 rather than a silently different answer
NOT_SUPPORTED = {"prompt_logprobs", "use_beam_search", "echo"}


@dataclass
class GenSpec:
    """One validated request: prompts (token ids) x n choices, decoded with `params`."""
    kind: str                        # "completion" or "chat"
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]          # for echo and moderation
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None      # None: off; k ≥ 0: chosen token + top k alternatives
    echo: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    audio_format: str | None = None  # an omni reply's audio: "wav" | "pcm16" (None: no audio asked for)
    continuous_usage: bool = False   # usage so far in every stream chunk
    grammar: str | None = None       # structured output / forced tool calls: an llguidance grammar
    tools: object = None             # gptlab.serve.structured.Tools: the reply's calls are read back
    adapter: int = 0                 # the LoRA adapter the `model` field chose (0: the base)


def check_fields(body: dict, known: set[str], endpoint: str) -> None:
    """Fields we know but do not do are a 400; unknown fields are logged and ignored."""
    refused = sorted(k for k in NOT_SUPPORTED - known if body.get(k) not in (None, False))  # chat has no echo
    if refused:
        raise APIError(400, f"'{refused[0]}' is not supported by this server", param=refused[0])
    unknown = sorted(set(body) - known)
    if unknown:
        log.warning("%s: ignoring unknown request fields %s", endpoint, unknown)


def _token_ids(body: dict, name: str, vocab: int) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not (isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in v)):
        raise APIError(400, f"'{name}' must be a list of token ids in 0..{vocab - 1}", param=name)
    return v


def sampling_fields(body: dict, max_tokens: int, prompt_len: int, ctx: int, stop_ids: tuple, name: str,
                    vocab: int):
    """SamplingParams for one request; a prompt that leaves no room or a max_tokens past the context is a 400."""
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (_text(stop, "stop"),)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP:
        stop = tuple(_text(s, "stop") for s in stop)
    else:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    stop_ids += tuple(_token_ids(body, "stop_token_ids", vocab))
    seed = body.get("seed")
    if seed is not None:
        seed = _int(body, "seed", None, -(2 ** 63), 2 ** 63 - 1) % (2 ** 63)
    if prompt_len >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens; your prompt is {prompt_len} "
                            "tokens, which leaves no room for a completion",
                       param="messages" if name == "chat" else "prompt",
                       code="context_length_exceeded")
    if prompt_len + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_k=_int(body, "top_k", 0, 0) if body.get("top_k") != -1 else 0,  # vLLM: -1 = off
                              top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                              min_p=_float(body, "min_p", 0.0, 0.0, 0.999999),
                              repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
                              stop=stop, stop_token_ids=stop_ids, seed=seed,
                              ignore_eos=_bool(body, "ignore_eos", False),
                              min_tokens=_int(body, "min_tokens", 0, 0, max_tokens),
                              include_stop_str=_bool(body, "include_stop_str_in_output", False))
    except GptlabError as e:
        raise APIError(400, str(e)) from None


def parse_request(body: dict, kind: str, encode_prompts, ctx: int, max_batch: int, vocab: int) -> GenSpec:
    """`encode_prompts(body) -> (list of token-id prompts, their texts, extra stop ids)` is endpoint-specific
    (raw prompts or a rendered chat); everything else is shared."""
    model = body.get("model")
    if model is None:
        raise APIError(400, "'model' is required", param="model")
    _text(model, "model")
    prompts, texts, stop_ids = encode_prompts(body)
    n = _int(body, "n", 1, 1, MAX_N)
    if n * len(prompts) > max_batch:
        raise APIError(400, f"n x prompts = {n * len(prompts)} choices exceeds this server's batch of {max_batch}",
                       param="n")
    if body.get("best_of") not in (None, n, 1) or (body.get("suffix") not in (None, "")):
        raise APIError(400, "best_of and suffix are not supported by this server",
                       param="best_of" if body.get("best_of") not in (None, n, 1) else "suffix")
    longest = max(len(p) for p in prompts)
    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    # OpenAI's defaults: 16 new tokens for legacy completions; chat runs to the end of the context
    default = 16 if kind == "completion" else max(1, ctx - longest)
    max_tokens = _int(body, name, default, 1, ctx)
    params = sampling_fields(body, max_tokens, longest, ctx, stop_ids, kind, vocab)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage") is True)
    continuous_usage = include_usage and opts.get("continuous_usage_stats") is True  # vLLM: usage in every chunk
    if opts and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if kind == "completion":
        lp = body.get("logprobs")
        logprobs = None if lp is None or lp is False else _int(body, "logprobs", 0, 0, MAX_LOGPROBS)
        echo = _bool(body, "echo", False)
    else:
        logprobs = (_int(body, "top_logprobs", 0, 0, MAX_CHAT_TOP_LOGPROBS)
                    if _bool(body, "logprobs", False) else None)
        if body.get("top_logprobs") is not None and logprobs is None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        echo = False
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must be an object of token id -> bias", param="logit_bias")
    logit_bias = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias key {k!r} is not a token id", param="logit_bias") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise APIError(400, "logit_bias values must be numbers in [-100, 100]", param="logit_bias")
        logit_bias[t] = float(v)
    return GenSpec(kind, model, prompts, texts, params, n, stream, include_usage, logprobs, echo, logit_bias,
                   _float(body, "presence_penalty", 0.0, -2.0, 2.0), _float(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   continuous_usage=continuous_usage)


# --- prompts -----------------------------------------------------------------------------------------------
def completion_prompts(body: dict, tok, vocab: int) -> tuple[list[list[int]], list[str]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise APIError(400, "'prompt' must be a string, a non-empty list of strings or of token ids", param="prompt")
    ids, texts = [], []
    for x in items:
        if isinstance(x, str):
            ids.append(tok.encode(_text(x, "prompt")))  # special tokens stay plain text
            texts.append(x)
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if any(not 0 <= t < vocab for t in x):
                raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            ids.append(list(x))
            texts.append(tok.decode(x))
        else:
            raise APIError(400, "'prompt' list items must all be strings or token-id lists", param="prompt")
    if len(ids) > MAX_N * 4:
        raise APIError(400, "too many prompts in one request", param="prompt")
    return [r or [tok.eot_id] for r in ids], texts  # an empty prompt starts a new document


def chat_render_options(body: dict) -> tuple[bool, bool]:
    """vLLM's add_generation_prompt (default true) and continue_final_message (default false)."""
    gp, cont = _bool(body, "add_generation_prompt", True), _bool(body, "continue_final_message", False)
    if gp and cont:
        raise APIError(400, "continue_final_message needs 'add_generation_prompt': false", param="continue_final_message")
    return gp, cont


def chat_messages(body: dict, tok=None) -> list[dict]:
    """OpenAI messages -> the chat template's {role, content}: text content parts are joined, `developer`
    is the system role (OpenAI renamed it), assistant tool_calls and `tool` results (each answering an
    earlier call's id) render through the template, legacy `function` messages are 400s; image_url and input_audio
    parts become media parts for an omni model (`tok`) and are 400s for any other."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out, call_ids = [], set()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (system, user, assistant, tool)",
                           param="messages")
        content = m.get("content")
        if role == "tool":
            if m.get("tool_call_id") not in call_ids:
                raise APIError(400, f"messages[{i}]: a 'tool' message must answer an earlier assistant tool call "
                                    f"(unknown tool_call_id {m.get('tool_call_id')!r})", param="messages")
            if isinstance(content, list):
                content = "".join(p.get("text", "") if isinstance(p, dict) else "" for p in content)
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"], "content": _text(content, f"messages[{i}].content")})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            try:
                check_calls(calls, f"messages[{i}]")
            except GptlabError as e:
                raise APIError(400, str(e), param="messages") from None
            call_ids |= {c.get("id") for c in calls}
            if isinstance(content, list):
                content = "".join(p.get("text", "") if isinstance(p, dict) else "" for p in content)
            out.append({"role": "assistant", "content": _text(content or "", f"messages[{i}].content"),
                        "tool_calls": calls})
            continue
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            from gptlab.serve.media import content_parts

            out.append({"role": role, "content": content_parts(content, i, tok)})
            continue
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                parts.append(_text(part.get("text"), f"messages[{i}].content"))
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        out.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    if any(m["role"] == "system" for m in out[1:]):
        raise APIError(400, "only the first message may be a system message", param="messages")
    return out
