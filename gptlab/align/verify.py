"""Verifiable rewards (RLVR): a response scores 1 when it matches the prompt file's own answer, 0 otherwise.

`--reward-fn match:MODE` on `gptlab grpo` / `gptlab ppo` reads each prompt row's "answer":
  exact   the response, stripped, equals the answer
  number  the last number in the response equals the answer's (GSM8K-style: "... so the total is 42.")
  regex   the answer is a regular expression that must match somewhere in the response
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from gptlab.errors import GptlabError

MODES = ("exact", "number", "regex")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def matches(response: str, answer: str, mode: str) -> bool:
    if mode == "exact":
        return response.strip() == answer.strip()
    if mode == "number":
        got, want = _number(response), _number(answer)
        return got is not None and want is not None and abs(got - want) < 1e-9
    return re.search(answer, response) is not None


def answer_reward(prompts, mode: str) -> Callable[[list[str], list[str]], list[float]]:
    """A reward_fn over the prompt file (or rows) `prompts`, whose rows carry "answer": it looks each rendered
    prompt up and scores its response 1.0 or 0.0 by `mode`."""
    from gptlab.align.data import load_prompts
    from gptlab.chat.template import render_text
    from gptlab.data.records import read_rows

    if mode not in MODES:
        raise GptlabError(f"match:{mode}: the answer checker is one of {', '.join('match:' + m for m in MODES)}")
    rows = read_rows(prompts) if isinstance(prompts, (str, Path)) else list(prompts or [])
    missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or "answer" not in r]
    if not rows or missing:
        raise GptlabError(f"match:{mode} needs an \"answer\" in every prompt row (row {missing[0] + 1 if missing else 1} "
                          "has none)")
    convs = load_prompts(prompts)
    answers = {render_text(c, add_generation_prompt=True): str(r["answer"]) for c, r in zip(convs, rows)}
    if mode == "regex":
        for a in answers.values():
            try:
                re.compile(a)
            except re.error as e:
                raise GptlabError(f"match:regex: the answer {a!r} is not a regular expression ({e})") from None

    def reward(prompt_texts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompt_texts, responses):
            if p not in answers:
                raise GptlabError("match: a prompt was shortened to fit the context and no longer matches its row; "
                                  "use shorter prompts or a larger context")
            out.append(1.0 if matches(r, answers[p], mode) else 0.0)
        return out

    return reward
