"""Structured output and tools in a request -> the grammar its rows decode under.

OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` (Lark, or GBNF as llama.cpp writes it) and its newer
`structured_outputs` object all become one llguidance grammar (gptlab.generate.constrain). `tools` with
`tool_choice` "required" or a named function also constrain the reply: tool calls only, arguments valid
for the function's parameters; "auto" leaves the model free and reads its calls back afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptlab.chat.tools import forced_call_grammar
from gptlab.errors import GptlabError
from gptlab.generate.constrain import compile_grammar
from gptlab.serve.protocol import APIError

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "lark"}
STRUCTURED = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "lark"}


@dataclass
class Tools:
    functions: list[dict]  # OpenAI's tools, validated
    choice: str            # "auto" | "none" | "required" | a function name
    parallel: bool = True


def _constraint(kind: str, value, param: str):
    """One source's (kind, spec), checked for shape."""
    if kind == "json" and not isinstance(value, (dict, str)):
        raise APIError(400, f"'{param}' must be a JSON Schema object", param=param)
    if kind in ("regex", "lark") and not (isinstance(value, str) and value):
        raise APIError(400, f"'{param}' must be a non-empty string", param=param)
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise APIError(400, f"'{param}' must be a non-empty list of non-empty strings", param=param)
    if kind == "lark" and "::=" in value:  # GBNF (llama.cpp's, vLLM's xgrammar): llguidance converts it
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            value = gbnf_to_lark(value)
        except Exception as e:  # noqa: BLE001 - its parser raises plain Exceptions
            raise APIError(400, f"invalid GBNF grammar in '{param}': {e}", param=param) from None
    return kind, value, param


def _response_format(fmt) -> tuple | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json", None, "response_format"
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise APIError(400, "response_format json_schema needs {'name', 'schema': {...}}", param="response_format")
        return "json", js.get("schema") or None, "response_format"
    raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format")


def parse_tools(body: dict) -> Tools | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise APIError(400, "'tools' must be a list of at most 128 functions", param="tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': [a-zA-Z0-9_-]{{1,64}}, "
                                "'parameters': {...}}}}", param="tools")
        if not isinstance(fn.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise APIError(400, f"tool_choice names a function not in 'tools': {name!r}", param="tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                            "{'name': ...}}", param="tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    return Tools(tools, choice, parallel is not False)


def request_grammar(body: dict, tools: Tools | None) -> str | None:
    """The llguidance grammar a request asks for (None: free text); more than one source is a 400."""
    sources = [s for s in [_response_format(body.get("response_format"))] if s]
    sources += [_constraint(kind, body[k], k) for k, kind in GUIDED.items() if body.get(k) is not None]
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise APIError(400, "'structured_outputs' must be an object", param="structured_outputs")
        if so.get("json_object"):
            sources.append(("json", None, "structured_outputs"))
        sources += [_constraint(kind, so[k], "structured_outputs") for k, kind in STRUCTURED.items()
                    if so.get(k) is not None]
    if tools is not None and tools.choice not in ("auto", "none"):
        name = None if tools.choice == "required" else tools.choice
        sources.append(("lark", forced_call_grammar(tools.functions, name, tools.parallel), "tool_choice"))
    if not sources:
        return None
    if len(sources) > 1:
        raise APIError(400, f"only one constraint per request: got {', '.join(p for *_, p in sources)}",
                       param=sources[1][2])
    kind, spec, param = sources[0]
    try:
        return compile_grammar(kind, spec)
    except GptlabError as e:
        raise APIError(400, str(e), param=param) from None
