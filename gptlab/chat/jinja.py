"""Hugging Face chat templates (the Jinja `chat_template` of a tokenizer_config.json), rendered as
transformers renders them, for models that lack gptlab's own chat tokens (e.g. imported with
`gptlab convert --from-hf`).

The environment is transformers' (sandboxed, trim_blocks, lstrip_blocks, loop controls, `tojson` without
ASCII escaping, `raise_exception`, `strftime_now`). The rendered text is encoded with special tokens parsed,
as transformers does, except inside message contents: each content is rendered as a sentinel first to find
where it lands, and special-token text there stays text, so a user cannot type a role marker. A template that
alters content on the way (e.g. `| trim`) is caught by the sentinel check and encoded as transformers would.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime
from pathlib import Path

from gptlab.errors import GptlabError

log = logging.getLogger("gptlab.chat")
TEMPLATE_FILE = "chat_template.jinja"  # in a run directory, as transformers saves it beside its tokenizer


def read_hf_template(d: Path) -> str | None:
    """The chat template an HF model directory carries: chat_template.jinja, or tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the one named 'default')."""
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    if not (d / "tokenizer_config.json").is_file():
        return None
    try:
        t = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


class JinjaChat:
    """A chat template over `tok`; render_ids mirrors gptlab.chat.template.render_ids."""

    def __init__(self, source: str, tok, bos: str | None = None, eos: str = "<|endoftext|>"):
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise GptlabError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise GptlabError(f"chat template does not parse: {e}") from None
        self.errors = jinja2.exceptions.TemplateError
        self.tok, self.bos, self.eos = tok, bos, eos

    def _render(self, messages, add_generation_prompt: bool, tools, continue_final: bool) -> str:
        try:
            return self.template.render(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final, bos_token=self.bos or "",
                                        eos_token=self.eos)
        except self.errors as e:
            raise GptlabError(f"chat template: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise GptlabError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None

    def render_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                   continue_final_message: bool = False, tools: list[dict] | None = None) -> list[int]:
        marks = {f"\x00{uuid.uuid4().hex}\x00": m["content"] for m in messages if isinstance(m.get("content"), str)}
        by_content = iter(marks)
        shown = [{**m, "content": next(by_content)} if isinstance(m.get("content"), str) else m for m in messages]
        text = self._render(shown, add_generation_prompt, tools, continue_final_message)
        if continue_final_message:  # as transformers: cut after the final message's content
            last = list(marks)[-1] if marks else None
            text = text[:text.rindex(last) + len(last)] if last and last in text else text
        if not all(text.count(s) == 1 for s in marks):  # the template changed or repeated a content
            log.warning("chat template alters message contents: special-token text in them is parsed")
            text = self._render(messages, add_generation_prompt, tools, continue_final_message)
            return self.tok.encode(text, allowed_special="all")
        out, spans, at = "", [], 0  # the final text, and where each content lies in it
        for i, s in sorted((text.index(s), s) for s in marks):
            out += text[at:i]
            spans.append((len(out), len(out) + len(marks[s])))
            out += marks[s]
            at = i + len(s)
        return self._encode(out + text[at:], spans)

    def _encode(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Special tokens are split out first and the text between them BPE-encoded, as transformers and
        tiktoken do, but only where the template wrote them: inside a content they stay text."""
        special = self.tok.special_tokens
        pattern = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
        ids, at = [], 0
        for m in pattern.finditer(text) if special else ():
            if any(a <= m.start() < b for a, b in spans):
                continue
            ids += self.tok.encode(text[at:m.start()]) + [special[m.group()]]
            at = m.end()
        return ids + self.tok.encode(text[at:])
