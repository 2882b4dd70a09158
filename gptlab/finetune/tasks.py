"""GPT-1's task-specific input transformations (paper §3.3, Figure 1).

Every task becomes one or more token sequences `[start] ... [extract]` for the unchanged pretrained
model; the final hidden state at the extract token feeds the task head:
- classification:   [start] text [extract]
- entailment:       [start] premise [delim] hypothesis [extract]
- similarity:       [start] a [delim] b [extract]  and  [start] b [delim] a [extract]; the two extract states
                    are added element-wise before the head (there is no inherent order of the two sentences)
- multiple choice:  [start] context [delim] answer_k [extract] for each choice k; one scalar per choice,
                    softmax over the choices
The start, delimiter and extract tokens are new special tokens, appended to the tokenizer and to the
embedding (new rows drawn like the others, N(0, init_std)) and learned during fine-tuning.

A sequence longer than the context is cut on the text side and keeps its special tokens: the longest text
part loses tokens first; texts keep their beginning, a multiple-choice context keeps its end (the part next
to the answer, e.g. the question after a passage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.finetune.data import Example, check_task
from gptlab.tokenizer import Tokenizer

START, DELIM, EXTRACT = "<|start|>", "<|delim|>", "<|extract|>"
TASK_TOKENS = (START, DELIM, EXTRACT)


@dataclass(frozen=True)
class TaskIds:
    start: int
    delim: int
    extract: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "TaskIds":
        special = tokenizer.special_tokens
        missing = [t for t in TASK_TOKENS if t not in special]
        if missing:
            raise GptlabError(f"tokenizer lacks the task tokens {missing}; add them with add_task_tokens()")
        return cls(special[START], special[DELIM], special[EXTRACT])


def add_task_tokens(tokenizer: Tokenizer, model=None) -> tuple[Tokenizer, list[int]]:
    """-> (tokenizer with the start/delim/extract tokens, ids of the tokens it did not have before). With a
    model, grow its embeddings to the new vocabulary; a new id that falls in a row the model already had
    (a vocabulary padded beyond the tokenizer's) gets that row redrawn, so every new token starts fresh."""
    new_names = [t for t in TASK_TOKENS if t not in tokenizer.special_tokens]
    tok = tokenizer.with_special_tokens(TASK_TOKENS)
    new_ids = [tok.special_tokens[t] for t in new_names]
    if model is not None:
        old_rows = model.cfg.vocab_size
        if tok.vocab_size > old_rows:
            model.resize_token_embeddings(tok.vocab_size)
        redraw = [i for i in new_ids if i < old_rows]
        if redraw:
            with torch.no_grad():
                for w in {id(p): p for p in (model.wte.weight, model.lm_head.weight)}.values():
                    w[redraw] = torch.randn(len(redraw), w.size(1), device=w.device, dtype=w.dtype) * model.cfg.init_std
    return tok, new_ids


def fit_lengths(lengths: list[int], budget: int) -> list[int]:
    """Longest-first truncation: shorten the longest part (ties: the first) until the total fits."""
    lengths = list(lengths)
    excess = sum(lengths) - budget
    while excess > 0:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        rest = [n for j, n in enumerate(lengths) if j != i]
        cut = min(excess, max(1, lengths[i] - max(rest, default=0)))
        lengths[i] -= cut
        excess -= cut
    return lengths


def _cut(ids: list[int], n: int, keep_end: bool = False) -> list[int]:
    if n >= len(ids):
        return ids
    return ids[len(ids) - n:] if keep_end else ids[:n]


def transform(task: str, parts: list[list[int]], ids: TaskIds, block_size: int) -> list[list[int]]:
    """Token ids of one example's text parts -> its input sequences (the extract token is each one's last).
    parts: classification [text]; entailment [premise, hypothesis]; similarity [a, b];
    multiple_choice [context, choice_1, ..., choice_K]."""
    check_task(task)
    s, d, e = ids.start, ids.delim, ids.extract
    if task == "classification":
        if len(parts) != 1:
            raise ValueError("classification takes one text")
        if block_size < 3:
            raise GptlabError(f"a context of {block_size} tokens cannot hold [start] text [extract]")
        return [[s, *_cut(parts[0], block_size - 2), e]]
    if block_size < 4:
        raise GptlabError(f"a context of {block_size} tokens cannot hold [start] a [delim] b [extract]")
    budget = block_size - 3
    if task in ("entailment", "similarity"):
        if len(parts) != 2:
            raise ValueError(f"{task} takes two texts")
        na, nb = fit_lengths([len(parts[0]), len(parts[1])], budget)
        a, b = _cut(parts[0], na), _cut(parts[1], nb)
        if task == "entailment":
            return [[s, *a, d, *b, e]]
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]]
    context, choices = parts[0], parts[1:]
    if len(choices) < 2:
        raise ValueError("multiple_choice takes a context and at least two choices")
    out = []
    for ch in choices:
        nc, na = fit_lengths([len(context), len(ch)], budget)
        out.append([s, *_cut(context, nc, keep_end=True), d, *_cut(ch, na), e])
    return out


def example_parts(task: str, ex: Example) -> list[str]:
    if task == "classification":
        return [ex.text]
    if task == "multiple_choice":
        return [ex.text, *ex.choices]
    return [ex.text, ex.text2 or ""]


def encode_examples(task: str, examples: list[Example], tokenizer: Tokenizer, block_size: int) -> list[list[list[int]]]:
    """Each example -> its input sequences (see transform). Texts are encoded as plain text: special-token
    strings inside the data cannot inject a start/extract token."""
    ids = TaskIds.of(tokenizer)
    texts = [example_parts(task, ex) for ex in examples]
    flat = tokenizer.encode_batch([t for parts in texts for t in parts])
    out, k = [], 0
    for parts in texts:
        out.append(transform(task, flat[k:k + len(parts)], ids, block_size))
        k += len(parts)
    return out
