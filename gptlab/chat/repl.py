"""A multi-turn chat REPL over any generator with ``stream(prompt_ids, params) -> Iterator[str]``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gptlab.chat.template import CHAT_TOKENS, END, Message, render_ids, truncate_history
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

HELP = ("commands: /system TEXT  set the system message (no TEXT: show it) | /reset  clear the history "
        "(keeps the system message) | /help  this list | /quit  exit (or Ctrl-D)")
PROMPT = "you> "


def run_chat(generator: Any, tokenizer: Tokenizer, context_len: int, params: Any,
             input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
             system: str | None = None) -> list[Message]:
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
            elif cmd == "/system":
                if arg.strip():
                    system = arg.strip()
                    print_fn("(system message set)")
                else:
                    print_fn(f"system: {system or '(none)'}")
            else:
                print_fn(f"unknown command {cmd}; /help lists commands")
            continue

        try:
            kept = truncate_history(tokenizer, conversation() + [{"role": "user", "content": text}],
                                    context_len, reserve=reserve)
        except GptlabError as e:
            print_fn(f"error: {e}")
            continue
        history[:] = kept[1:] if system else kept  # dropped turns never come back
        ids, _ = render_ids(tokenizer, kept, add_generation_prompt=True)
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
