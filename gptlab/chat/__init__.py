"""Chat: the one chat template (special tokens, rendering, history truncation) and a REPL."""

from gptlab.chat.repl import run_chat
from gptlab.chat.template import (CHAT_TOKENS, END, JINJA_TEMPLATE, ROLE_TOKENS, ROLES, ensure_chat_tokens,
                                  render_ids, render_text, truncate_history, validate_messages)

__all__ = ["CHAT_TOKENS", "END", "JINJA_TEMPLATE", "ROLE_TOKENS", "ROLES", "ensure_chat_tokens", "render_ids",
           "render_text", "truncate_history", "validate_messages", "run_chat"]
