"""Alignment data: demonstrations (SFT), ranked preferences (reward model, DPO) and prompts (PPO).

Every loader takes a path (JSONL, JSON, CSV or TSV via `gptlab.data.records.read_rows`; `.txt` for prompts)
or a list of dicts, and turns rows into chat-template conversations (`Message` = {"role", "content"}).

Layouts understood, per row:
- SFT: {"prompt", "response"} (+ optional "system"); {"messages": [...]} (multi-turn, a JSON string in CSV;
  with an optional "tools" list, assistant "tool_calls" and "tool" results, as in OpenAI's chat API);
  Alpaca {"instruction", "input", "output"} (the input, when present, follows the instruction after a blank
  line, as in Alpaca's own prompt); Self-Instruct seed tasks {"instruction", "instances": [{"input",
  "output"}, ...]} (one example per instance: the shared seed_tasks.jsonl loads as is).
- Preferences: {"prompt", "responses": [...best first]}, {"prompt", "chosen", "rejected"}, and Anthropic HH
  {"chosen", "rejected"} full dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ..."), split into turns: the shared
  prefix is the prompt, the two final assistant turns the responses. Pairs whose responses are identical or
  whose dialogues differ before the last assistant turn are skipped and counted (they carry no comparison).
- Prompts: {"prompt"} / {"messages"} ending on a user turn (or any SFT row: its conversation up to the last
  assistant turn), `.txt` one prompt per line, or the prompts of a preference file.

Bad input is a one-line GptlabError naming the file and line.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.chat.template import validate_messages
from gptlab.chat.tools import with_tools
from gptlab.data.hf_rows import is_hf_source
from gptlab.data.records import read_rows
from gptlab.errors import GptlabError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}, as gptlab.chat.template uses


@dataclass
class Preference:
    prompt: list[Message]   # the conversation up to the responses; ends with a user turn
    responses: list[str]    # ranked best first, at least two


@dataclass
class LoadStats:
    """What a loader skipped, by reason (filled when passed as `stats=`)."""
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


# --- rows ----------------------------------------------------------------------------------------
def _rows(src, what: str) -> tuple[list[dict], str]:
    """-> (rows, name for messages). Rows from a file keep their `_line`; given lists count from 1."""
    if isinstance(src, (str, Path)):
        rows = read_rows(src)
        p = Path(src)
        if is_hf_source(src):
            return rows, f"{src}:row"
        return rows, str(p) + (":item" if p.suffix.lower() == ".json" else ":line")
    if isinstance(src, list):
        if not src:
            raise GptlabError(f"no {what} given (empty list)")
        if not all(isinstance(r, dict) for r in src):
            raise GptlabError(f"{what} must be a list of dicts (one per example)")
        return [{**r, "_line": r.get("_line", i)} for i, r in enumerate(src, 1)], "<list>:row"
    raise GptlabError(f"{what}: expected a file path or a list of dicts, got {type(src).__name__}")


def _where(name: str, row: dict) -> str:
    return f"{name} {row['_line']}"


def _text(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = row.get(key)
    if v is None:
        raise GptlabError(f"{where}: missing field {key!r}")
    if not isinstance(v, str):
        raise GptlabError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise GptlabError(f"{where}: field {key!r} is empty")
    return v


def _messages(v, where: str, key: str = "messages", base: Path | None = None) -> list[Message]:
    if isinstance(v, str):  # CSV/TSV cells hold the list as JSON text
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise GptlabError(f"{where}: field {key!r} is not a JSON list of messages") from None
    if not isinstance(v, list):
        raise GptlabError(f"{where}: field {key!r} must be a list of {{'role', 'content'}} messages")
    if any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in v):  # content parts: media
        from gptlab.omni.media import load_content

        v = [{**m, "content": load_content(m.get("content"), f"{where} message {i}", base)} if isinstance(m, dict)
             else m for i, m in enumerate(v)]
    try:
        validate_messages(v)
    except GptlabError as e:
        raise GptlabError(f"{where}: {e}") from None
    return [{k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id") if k in m} for m in v]


def _prompt_messages(row: dict, where: str) -> list[Message]:
    """The "prompt" field: a string (one user turn, after an optional "system") or a list of messages."""
    p = row.get("prompt")
    if isinstance(p, str) and p.lstrip().startswith("[{"):  # a CSV cell holding a JSON list of messages
        try:
            parsed = json.loads(p)
            if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
                p = parsed
        except json.JSONDecodeError:
            pass
    if isinstance(p, list):
        msgs = _messages(p, where, "prompt")
    else:
        msgs = [{"role": "user", "content": _text(row, "prompt", where)}]
        if row.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(row, "system", where)})
    if msgs[-1]["role"] != "user":
        raise GptlabError(f"{where}: the prompt must end with a user turn, not {msgs[-1]['role']!r}")
    return msgs


def _tools(row: dict, where: str) -> list[dict] | None:
    """An optional "tools" field: OpenAI's function list, rendered into the system message."""
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise GptlabError(f"{where}: field 'tools' must be a list of OpenAI function objects")
    return tools


def _alpaca_user(instruction: str, inp: str) -> str:
    return instruction.strip() + (f"\n\n{inp.strip()}" if inp and inp.strip() else "")


def _sft_conversations(row: dict, where: str, base: Path | None = None) -> list[list[Message]]:
    """One row -> its conversation(s), each ending on an assistant turn (not yet checked for emptiness).
    Media paths in content parts are relative to `base` (the data file's folder)."""
    if "messages" in row:
        msgs = with_tools(_messages(row["messages"], where, base=base), _tools(row, where))
        while msgs and msgs[-1]["role"] != "assistant":  # trailing user turns train nothing
            msgs.pop()
        if not msgs:
            raise GptlabError(f"{where}: the conversation has no assistant turn to train on")
        return [msgs]
    if "instances" in row:  # Self-Instruct seed task: one instruction, several (input, output) instances
        ins = _text(row, "instruction", where)
        inst = row["instances"]
        if not isinstance(inst, list) or not inst or not all(isinstance(i, dict) for i in inst):
            raise GptlabError(f"{where}: 'instances' must be a non-empty list of {{'input', 'output'}} objects")
        return [[{"role": "user", "content": _alpaca_user(ins, str(i.get("input") or ""))},
                 {"role": "assistant", "content": _text(i, "output", f"{where} instance {k}", allow_empty=True)}]
                for k, i in enumerate(inst)]
    if "instruction" in row:
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise GptlabError(f"{where}: field 'input' must be a string")
        return [[{"role": "user", "content": _alpaca_user(_text(row, "instruction", where), inp)},
                 {"role": "assistant", "content": _text(row, "output", where, allow_empty=True)}]]
    if "prompt" in row:
        msgs = _prompt_messages(row, where)
        return [msgs + [{"role": "assistant", "content": _text(row, "response", where, allow_empty=True)}]]
    keys = sorted(k for k in row if k != "_line")
    raise GptlabError(f"{where}: unknown layout (fields {keys}); expected prompt/response, messages, "
                      "instruction/input/output or instruction/instances")


def load_sft_examples(src: str | Path | list[dict], *, skip_empty: bool = False,
                      stats: LoadStats | None = None) -> list[list[Message]]:
    """Demonstrations -> conversations ending on an assistant turn. An empty final response is an error
    (naming file and line) unless `skip_empty`, which drops such rows and reports how many."""
    rows, name = _rows(src, "SFT examples")
    base = None if not isinstance(src, (str, Path)) else Path(src) if is_hf_source(src) else Path(src).parent
    stats = stats if stats is not None else LoadStats()
    out: list[list[Message]] = []
    for row in rows:
        where = _where(name, row)
        stats.rows += 1
        for conv in _sft_conversations(row, where, base):
            last = conv[-1]["content"]
            if not (last.strip() if isinstance(last, str) else last):
                if not skip_empty:
                    raise GptlabError(f"{where}: empty response (nothing to train on); fix the row or pass "
                                      "--skip-empty (skip_empty=True) to drop such rows")
                stats.skip("empty response")
                continue
            out.append(conv)
    if stats.skipped:
        print(f"note: {src if isinstance(src, (str, Path)) else 'SFT data'}: skipped "
              + ", ".join(f"{n} × {r}" for r, n in stats.skipped.items()), file=sys.stderr)
    if not out:
        raise GptlabError(f"{name.rsplit(':', 1)[0]}: no usable examples")
    return out


# --- preferences ---------------------------------------------------------------------------------
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh_dialogue(text: str, where: str = "dialogue") -> list[Message]:
    """"\\n\\nHuman: a\\n\\nAssistant: b..." -> [{"user", "a"}, {"assistant", "b"}, ...] (contents stripped)."""
    if not isinstance(text, str):
        raise GptlabError(f"{where}: an HH dialogue must be a string")
    t = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")  # some dumps drop the leading blank line
    parts = _HH_TURN.split(t)
    if parts[0].strip() or len(parts) < 3:
        raise GptlabError(f"{where}: not an HH dialogue (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _hh_pair(row: dict, where: str, stats: LoadStats) -> Preference | None:
    c = split_hh_dialogue(_text(row, "chosen", where), f"{where} (chosen)")
    r = split_hh_dialogue(_text(row, "rejected", where), f"{where} (rejected)")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise GptlabError(f"{where}: an HH dialogue must end with an Assistant turn")
    if c[:-1] != r[:-1]:
        stats.skip("dialogues differ before the last assistant turn")
        return None
    if c[-1]["content"] == r[-1]["content"]:
        stats.skip("chosen == rejected")
        return None
    prompt = c[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise GptlabError(f"{where}: the dialogue before the last assistant turn must end with a Human turn")
    return Preference(prompt, [c[-1]["content"], r[-1]["content"]])


def _responses(row: dict, where: str) -> list[str]:
    v = row["responses"]
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise GptlabError(f"{where}: field 'responses' is not a JSON list of strings") from None
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise GptlabError(f"{where}: field 'responses' must be a list of strings, ranked best first")
    if len(v) < 2:
        raise GptlabError(f"{where}: 'responses' needs at least two ranked responses, got {len(v)}")
    return list(v)


def load_preferences(src: str | Path | list[dict], *, stats: LoadStats | None = None,
                     quiet: bool = False) -> list[Preference]:
    """Ranked preferences. Rows without a comparison (identical responses, HH dialogues that differ before
    their last assistant turn) are skipped; the count is printed (unless quiet) and kept in `stats`."""
    rows, name = _rows(src, "preferences")
    stats = stats if stats is not None else LoadStats()
    out: list[Preference] = []
    for row in rows:
        where = _where(name, row)
        stats.rows += 1
        if "responses" in row:
            pref = Preference(_prompt_messages(row, where), _responses(row, where))
        elif "chosen" in row and "rejected" in row:
            if "prompt" not in row:
                pref = _hh_pair(row, where, stats)
                if pref is None:
                    continue
            else:
                pref = Preference(_prompt_messages(row, where),
                                  [_text(row, "chosen", where, True), _text(row, "rejected", where, True)])
        else:
            keys = sorted(k for k in row if k != "_line")
            raise GptlabError(f"{where}: unknown preference layout (fields {keys}); expected prompt/responses, "
                              "prompt/chosen/rejected or HH chosen/rejected dialogues")
        if len(set(pref.responses)) < len(pref.responses):
            if len(pref.responses) == 2:
                stats.skip("chosen == rejected")
                continue
            raise GptlabError(f"{where}: the ranked responses repeat one text; a ranking needs distinct responses")
        out.append(pref)
    if stats.skipped and not quiet:
        print(f"note: {src if isinstance(src, (str, Path)) else 'preferences'}: kept {len(out)} of {stats.rows} rows; "
              "skipped " + ", ".join(f"{n} ({r})" for r, n in stats.skipped.items()), file=sys.stderr)
    if not out:
        raise GptlabError(f"{name.rsplit(':', 1)[0]}: no usable preference pairs")
    return out


# --- prompts -------------------------------------------------------------------------------------
def load_prompts(src: str | Path | list[dict]) -> list[list[Message]]:
    """Prompts for PPO: each a conversation ending on a user turn."""
    if isinstance(src, (str, Path)) and Path(src).suffix.lower() == ".txt":
        p = Path(src)
        if not p.is_file():
            raise GptlabError(f"prompt file not found: {p}")
        try:
            lines = p.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise GptlabError(f"{p}: invalid UTF-8 (byte {e.start}); convert the file to UTF-8") from None
        out = [[{"role": "user", "content": ln.strip()}] for ln in lines if ln.strip()]
        if not out:
            raise GptlabError(f"{p}: no prompts (the file is empty)")
        return out
    rows, name = _rows(src, "prompts")
    if any("chosen" in r or "responses" in r for r in rows):
        return [p.prompt for p in load_preferences(rows if not isinstance(src, (str, Path)) else src, quiet=True)]
    out = []
    for row in rows:
        where = _where(name, row)
        if "messages" in row:
            msgs = _messages(row["messages"], where)
        elif "prompt" in row and "response" not in row:
            msgs = _prompt_messages(row, where)
        else:  # an SFT row: its conversation before the final assistant turn
            msgs = _sft_conversations(row, where)[0][:-1]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise GptlabError(f"{where}: a prompt must end with a user turn")
        out.append(msgs)
    return out
