"""Function calling in the one chat template: how tools, calls and results render, and how a reply's calls
are read back.

The layout is Hermes' (also Qwen2.5's), in plain text, so no model needs new special tokens:
  - the tool list joins the system message, one JSON object per line inside ``<tools></tools>``;
  - an assistant's calls follow its text, each ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
  - a ``tool`` message (a call's result) is a user turn holding ``<tool_response>\\n...\\n</tool_response>``.
An SFT row may carry ``"tools"`` beside ``"messages"``; its assistant calls are trained on like any reply.
"""

from __future__ import annotations

import json
import re
import uuid

from gptlab.errors import GptlabError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def tools_text(tools: list[dict]) -> str:
    return TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + "\n" + TOOLS_FOOTER


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with the tool list in its system message (a new one if it has none)."""
    if not tools:
        return list(messages)
    block = tools_text(tools)
    if messages and messages[0].get("role") == "system":
        content = messages[0]["content"]
        if isinstance(content, list):
            content = [*content, {"type": "text", "text": "\n\n" + block}]
        else:
            content = (content + "\n\n" if content else "") + block
        return [{**messages[0], "content": content}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def call_text(call: dict) -> str:
    """One OpenAI tool call {"function": {"name", "arguments"}} (or {"name", "arguments"}) as it renders.
    Arguments given as a string (OpenAI's wire format) render as they are; a dict as JSON."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def message_text(m: dict) -> str | list | None:
    """The text an assistant-with-calls or tool message renders as (None: render the content as is)."""
    if m["role"] == "tool":
        return f"<tool_response>\n{m['content']}\n</tool_response>"
    calls = m.get("tool_calls")
    if m["role"] != "assistant" or not calls:
        return None
    text = m.get("content") or ""
    for i, c in enumerate(calls):
        text += ("\n" if i or text else "") + call_text(c)
    return text


def check_calls(calls, where: str) -> None:
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise GptlabError(f"{where}: tool_calls must be a list of objects")
    for c in calls:
        fn = c.get("function", c)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GptlabError(f"{where}: each tool call needs a function name")
        if not isinstance(fn.get("arguments", {}), (str, dict)):
            raise GptlabError(f"{where}: tool call arguments must be a JSON string or an object")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """A reply -> (its text before the first call, OpenAI tool calls). A call that is not
    {"name": str, "arguments": object} JSON leaves the whole reply as text, as vLLM's Hermes parser does."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for m in _CALL.finditer(text, start):
        call = _call(m.group(1))
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return text[:start].rstrip("\n"), calls


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments", {}), dict)):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}


class CallStream:
    """Streams a reply's text until a tool call opens, then holds text back and hands out each call whole
    when its closing tag arrives (OpenAI's delta.tool_calls, one chunk per call)."""

    def __init__(self):
        self.buf, self.calling, self.calls = "", False, 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buf += text
        out, calls = "", []
        while True:
            if not self.calling:
                i = self.buf.find(OPEN)
                if i < 0:  # keep a possible partial "<tool_c" (or the newline before a call) at the end
                    keep = 0 if final else _partial(self.buf, OPEN)
                    head = self.buf[:len(self.buf) - keep]
                    keep += 0 if final else len(head) - len(head.rstrip("\n"))
                    out, self.buf = out + self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    break
                out += self.buf[:i].rstrip("\n") if self.calls == 0 else ""  # text between calls is not content
                self.buf, self.calling = self.buf[i:], True
            j = self.buf.find(CLOSE)
            if j < 0:
                break
            call = _call(self.buf[len(OPEN):j].strip())
            if call is None:  # not a well-formed call: it was text after all
                out += self.buf[:j + len(CLOSE)]
            else:
                calls.append({"index": self.calls, **call})
                self.calls += 1
            self.buf, self.calling = self.buf[j + len(CLOSE):].lstrip("\n"), False
        if final and self.buf:  # an unfinished call (max_tokens): nothing is lost
            out, self.buf = out + self.buf, ""
        return out, calls


def _partial(s: str, tag: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of tag."""
    for k in range(min(len(s), len(tag) - 1), 0, -1):
        if s.endswith(tag[:k]):
            return k
    return 0


def forced_call_grammar(tools: list[dict], name: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect, %json for a schema) for replies that are only tool calls, each
    naming one of `tools` (or `name`) with arguments valid for its parameter schema."""
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules, alts = [], []
    for k, fn in enumerate(fns):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        head = json.dumps(f'{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": ', ensure_ascii=False)
        rules.append(f"f{k}: {head} a{k} \"}}\"\na{k}: %json {json.dumps(params)}")
        alts.append(f"f{k}")
    call = f'call: {json.dumps(OPEN + chr(10))} ({" | ".join(alts)}) {json.dumps(chr(10) + CLOSE)}'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, call, *rules])
