"""A multi-turn chat REPL over any generator with ``stream(prompt_ids, params) -> Iterator[str]``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gptlab.chat.template import CHAT_TOKENS, END, Message, render_ids, truncate_history
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

HELP = ("commands: /system TEXT  set the system message (no TEXT: show it) | /reset  clear the history "
        "(keeps the system message) | /image PATH, /audio PATH  attach to your next message (omni models) | "
        "/help  this list | /quit  exit (or Ctrl-D)")
PROMPT = "you> "


def run_chat(generator: Any, tokenizer: Tokenizer, context_len: int, params: Any,
             input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
             system: str | None = None, media_dir: str = "chat_media") -> list[Message]:
    """Chat until /quit or EOF; returns the final conversation (system message first, if any).

    Each turn: append the user message, drop the oldest turns so the prompt plus the reply's budget
    (``params.max_new_tokens``, at most half the context) fits ``context_len``, render with the
    generation prompt and stream the reply, stopping at ``<|end|>`` or any other role token (a model
    that starts a new turn has finished its own). ``tokenizer`` must already have the chat tokens."""
    if tokenizer.special_tokens.get(END) is None:
        raise GptlabError("tokenizer lacks the chat tokens; add them with ensure_chat_tokens()")
    role_ids = tuple(tokenizer.special_tokens[t] for t in CHAT_TOKENS)
    reserve = min(params.max_new_tokens, context_len // 2)
    params = dataclasses.replace(params, stop_token_ids=tuple(params.stop_token_ids) + role_ids,
                                 max_new_tokens=reserve)
    history: list[Message] = []
    attached: list[dict] = []  # media for the next user message
    omni = hasattr(tokenizer, "codecs")
    print_fn("chat: /help lists commands")

    def conversation() -> list[Message]:
        return ([{"role": "system", "content": system}] if system else []) + history

    while True:
        try:
            line = input_fn(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print_fn()
            return conversation()
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit":
                return conversation()
            if cmd == "/help":
                print_fn(HELP)
            elif cmd == "/reset":
                history.clear()
                print_fn("(history cleared)")
            elif cmd in ("/image", "/audio"):
                kind = cmd[1:]
                try:
                    if not (omni and tokenizer.has(kind)):
                        raise GptlabError(f"this model cannot take {kind} input")
                    from gptlab.omni.media import load_part

                    attached.append(load_part({"type": kind, "path": arg.strip()}, cmd))
                    print_fn(f"({kind} attached to your next message)")
                except GptlabError as e:
                    print_fn(f"error: {e}")
            elif cmd == "/system":
                if arg.strip():
                    system = arg.strip()
                    print_fn("(system message set)")
                else:
                    print_fn(f"system: {system or '(none)'}")
            else:
                print_fn(f"unknown command {cmd}; /help lists commands")
            continue

        content = [{"type": "text", "text": text}, *attached] if attached else text
        try:
            kept = truncate_history(tokenizer, conversation() + [{"role": "user", "content": content}],
                                    context_len, reserve=reserve)
        except GptlabError as e:
            print_fn(f"error: {e}")
            continue
        history[:] = kept[1:] if system else kept  # dropped turns never come back
        attached = []
        ids, _ = render_ids(tokenizer, kept, add_generation_prompt=True)
        if omni:  # the reply may hold images and speech: decoded whole, media saved to files
            history.append({"role": "assistant", "content": _omni_reply(generator, tokenizer, ids, params, print_fn,
                                                                        media_dir, len(history))})
            continue
        parts: list[str] = []
        try:
            for delta in generator.stream(ids, params):
                print_fn(delta, end="", flush=True)
                parts.append(delta)
        except KeyboardInterrupt:
            print_fn(" (interrupted)", end="")
        print_fn()
        reply = "".join(parts)
        history.append({"role": "assistant", "content": reply.removesuffix(END)})


def _omni_reply(generator, tokenizer, ids: list[int], params, print_fn, media_dir: str, turn: int) -> list[dict]:
    from gptlab.generate.spans import split_reply
    from gptlab.omni.media import save_reply_media

    parts = split_reply(tokenizer, generator.generate([ids], params)[0].token_ids)
    paths = iter(save_reply_media(parts, media_dir, f"reply{turn:03d}"))
    for p in parts:
        print_fn(p["text"] if p["type"] == "text" else f"[{p['type']} saved to {next(paths)}]", end=" ")
    print_fn()
    return [{k: v for k, v in p.items() if k != "codes"} for p in parts] or [{"type": "text", "text": ""}]
