"""The one chat template shared by generation, SFT, the reward model and the server.

A conversation renders as, per message, ``<|role|>`` content ``<|end|>`` then a newline::

    <|system|>Be brief.<|end|>
    <|user|>Hi<|end|>
    <|assistant|>Hello!<|end|>
    <|assistant|>            <- the generation prompt

Role and end markers are special ids; message content is always encoded with special tokens
disabled, so text typed by a user can never become a role marker or ``<|endoftext|>``.

Function calling (gptlab.chat.tools): a ``tools`` list joins the system message, an assistant message's
``tool_calls`` follow its text as ``<tool_call>`` blocks, and a ``tool`` message (a call's result) is a
user turn wrapping its content in ``<tool_response>``.

Content is a string, or (an omni model's) list of parts in OpenAI's shape: {"type": "text", "text"},
{"type": "image", "image": array} and {"type": "audio", "audio": 16 kHz array}; a media part becomes its
marker-delimited codes (``OmniTokenizer.encode_media``), in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gptlab.chat.tools import TOOLS_FOOTER, TOOLS_HEADER, check_calls, message_text, with_tools
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END]

# The same template in Jinja, for Hugging Face's ``tokenizer.chat_template`` (matches render_text, tools
# included: transformers' apply_chat_template passes them as ``tools``).
_J_TOOLS = ("{{ '" + TOOLS_HEADER.replace("\n", "\\n") + "' }}{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}"
            "{{ '\\n" + TOOLS_FOOTER.replace("\n", "\\n") + "' }}")
JINJA_TEMPLATE = (
    "{% set tools = tools or [] %}"
    "{% if tools and messages[0]['role'] != 'system' %}<|system|>" + _J_TOOLS + "<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|user|><tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] or '' }}"
    "{% if message['role'] == 'system' and tools %}{% if message['content'] %}{{ '\\n\\n' }}{% endif %}"
    + _J_TOOLS + "{% endif %}"
    "{% for call in message['tool_calls'] or [] %}{% set fn = call['function'] or call %}"
    "{% if loop.index0 or message['content'] %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ (fn['arguments'] or {}) | tojson }}{% endif %}"
    "}\n</tool_call>{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

Message = dict[str, Any]


def add_chat_tokens(tokenizer: Tokenizer, model=None) -> tuple[Tokenizer, list[int]]:
    """-> (a tokenizer that has the chat tokens, the ids it added: rows never trained, which LoRA trains as
    token rows). With a model, grow its embeddings when the tokenizer now has more ids than it has rows."""
    new = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if new:
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    if model is not None and model.cfg.vocab_size < tokenizer.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size)
    return tokenizer, [tokenizer.special_tokens[t] for t in new]


def ensure_chat_tokens(tokenizer: Tokenizer, model=None) -> Tokenizer:
    """`add_chat_tokens` without the added ids."""
    return add_chat_tokens(tokenizer, model)[0]


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise GptlabError (one line) unless ``messages`` is a well-formed, non-empty conversation."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence) or not messages:
        raise GptlabError("a conversation must be a non-empty list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not ("content" in m or m.get("tool_calls")):
            raise GptlabError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise GptlabError(f"message {i} has unknown role {m['role']!r} (use system, user, assistant or tool)")
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise GptlabError(f"message {i}: only assistant messages may have tool_calls")
            check_calls(m["tool_calls"], f"message {i}")
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise GptlabError(f"message {i}: an assistant message with tool_calls has text content")
        elif m["role"] == "tool" and not isinstance(m["content"], str):
            raise GptlabError(f"message {i}: a tool message's content must be a string")
        elif isinstance(m["content"], list):
            for j, part in enumerate(m["content"]):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image", "audio") or kind not in part:
                    raise GptlabError(f"message {i} part {j} must be {{'type': 'text'|'image'|'audio', <type>: ...}}")
                if kind == "text" and not isinstance(part["text"], str):
                    raise GptlabError(f"message {i} part {j}: text must be a string")
        elif not isinstance(m["content"], str):
            raise GptlabError(f"message {i} content must be a string or a list of parts, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise GptlabError(f"message {i} is a system message; only the first message may be one")


def _chat_ids(tokenizer: Tokenizer) -> dict[str, int]:
    special = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in special]
    if missing:
        raise GptlabError(f"tokenizer lacks the chat tokens {missing}; add them with ensure_chat_tokens()")
    return {t: special[t] for t in CHAT_TOKENS}


def _content(m: Message):
    """What a message renders: its content, or its tool calls / tool result in the template's text."""
    text = message_text(m)
    return m["content"] if text is None else text


def _role_token(m: Message) -> str:
    return ROLE_TOKENS["user" if m["role"] == "tool" else m["role"]]


def content_ids(tokenizer: Tokenizer, content) -> list[int]:
    """A message's content -> ids: text with special tokens disabled, media parts as their codes."""
    if isinstance(content, str):
        return tokenizer.encode(content)
    ids: list[int] = []
    for part in content:
        if part["type"] == "text":
            ids += tokenizer.encode(part["text"])
        elif not hasattr(tokenizer, "encode_media"):
            raise GptlabError(f"this model reads text only: it cannot take {part['type']} input")
        else:
            ids += tokenizer.encode_media(part["type"], part[part["type"]])
    return ids


def content_text(content) -> str:
    """The text of a message's content; media parts shown as their empty marker pair."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else f"<|{p['type']}|><|/{p['type']}|>" for p in content)


def _message_ids(tokenizer: Tokenizer, m: Message, chat: dict[str, int],
                 newline: list[int]) -> tuple[list[int], list[bool]]:
    content = content_ids(tokenizer, _content(m))
    train = m["role"] == "assistant"
    ids = [chat[_role_token(m)], *content, chat[END], *newline]
    mask = [False] + [train] * (len(content) + 1) + [False] * len(newline)
    return ids, mask


def render_ids(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and ``assistant_mask``: True on assistant content and its
    ``<|end|>`` (the tokens SFT trains on), False on role markers, newlines and other messages.
    ``continue_final_message`` leaves a final assistant message open (no ``<|end|>``): the model goes on
    writing it, as vLLM's option of that name does. ``tools`` (OpenAI's function list) join the system message."""
    validate_messages(messages)
    messages = with_tools(messages, tools)
    if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise GptlabError("continue_final_message needs a final assistant message and no generation prompt")
    chat, newline = _chat_ids(tokenizer), tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        i, k = _message_ids(tokenizer, m, chat, newline)
        ids += i
        mask += k
    if continue_final_message:
        del ids[-1 - len(newline):], mask[-1 - len(newline):]
    if add_generation_prompt:
        ids.append(chat[ROLE_TOKENS["assistant"]])
        mask.append(False)
    return ids, mask


def render_text(messages: Sequence[Message], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The conversation as text (for display and the Jinja export); encoding it with all special
    tokens allowed gives ``render_ids`` whenever no content contains special-token text."""
    validate_messages(messages)
    messages = with_tools(messages, tools)
    text = "".join(f"{_role_token(m)}{content_text(_content(m))}{END}\n" for m in messages)
    return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


def truncate_history(tokenizer: Tokenizer, messages: Sequence[Message], max_tokens: int, reserve: int = 0,
                     add_generation_prompt: bool = True) -> list[Message]:
    """Drop the oldest whole turns (a user message and the replies after it) until the rendered prompt
    plus ``reserve`` new tokens fits in ``max_tokens``. The system message and the last turn are always
    kept; if they alone do not fit, raise GptlabError."""
    validate_messages(messages)
    chat, newline = _chat_ids(tokenizer), tokenizer.encode("\n")
    system = list(messages[:1]) if messages[0]["role"] == "system" else []
    turns: list[list[Message]] = []
    for m in messages[len(system):]:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)

    def size(msgs: list[Message]) -> int:
        return sum(len(_message_ids(tokenizer, m, chat, newline)[0]) for m in msgs)

    budget = max_tokens - reserve - int(add_generation_prompt) - size(system)
    sizes = [size(t) for t in turns]
    start = 0
    while start < len(turns) - 1 and sum(sizes[start:]) > budget:
        start += 1
    if sum(sizes[start:]) > budget:
        raise GptlabError("message too long for the context window")
    return system + [m for t in turns[start:] for m in t]
