"""Predictions of a fine-tuned run: the same input transformation and head as in training, no dropout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from gptlab.errors import GptlabError
from gptlab.finetune.data import Example, check_task
from gptlab.finetune.tasks import encode_examples
from gptlab.finetune.train import collate, task_scores
from gptlab.run import Run


@dataclass
class Prediction:
    label: str                 # the class name; for multiple choice the index of the chosen answer
    prob: float                # its probability
    probs: dict[str, float]    # every class (or choice index) -> probability
    choice: str | None = None  # multiple choice: the chosen answer's text

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.choice is None:
            d.pop("choice")
        return d


def task_of(run: Run) -> dict:
    """The run's task config {type, fields, labels, lm_coef, ...}; a run without a head is an error."""
    task = run.config.get("task")
    if not isinstance(task, dict) or not run.model.cfg.head:
        raise GptlabError(f"{run.path} is not a fine-tuned run (no task head); make one with `gptlab finetune`")
    check_task(task.get("type"))
    return task


def as_example(task: str, item) -> Example:
    """A str (classification), a (text, text2) pair (entailment, similarity), a (context, [choices]) pair
    or {"context", "choices"} dict (multiple choice), or an Example."""
    if isinstance(item, Example):
        return item
    if task == "classification":
        if not isinstance(item, str):
            raise GptlabError(f"classification takes texts, got {type(item).__name__}")
        return Example(item)
    if task == "multiple_choice":
        if isinstance(item, dict):
            item = (item.get("context"), item.get("choices"))
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (list, tuple)) and len(item[1]) >= 2 and all(isinstance(c, str) for c in item[1])):
            raise GptlabError("multiple_choice takes (context, [at least 2 choices]) pairs")
        return Example(item[0], choices=tuple(item[1]))
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
        raise GptlabError(f"{task} takes (text, text2) pairs of strings")
    return Example(item[0], item[1])


@torch.inference_mode()
def predict(run: Run, inputs: Iterable, batch_size: int = 32) -> list[Prediction]:
    """Classify `inputs` (see as_example) with a fine-tuned run (gptlab.run.load_run)."""
    info = task_of(run)
    task, labels = info["type"], info.get("labels")
    examples = [as_example(task, x) for x in inputs]
    if not examples:
        return []
    model = run.model
    model.eval()
    block = min(run.config.get("train", {}).get("block_size") or model.cfg.block_size, model.cfg.block_size)
    seqs = encode_examples(task, examples, run.tokenizer, block)
    device = model.wte.weight.device
    out: list[Prediction] = []
    if batch_size < 1:
        raise GptlabError(f"batch size must be ≥ 1, got {batch_size}")
    for k in range(0, len(seqs), batch_size):
        chunk = seqs[k:k + batch_size]
        b = collate(chunk, None, run.tokenizer.eot_id, device)
        probs = torch.softmax(task_scores(model, model.hidden(b.x), b.extract, b.counts, task).float(), -1).cpu()
        for i, p in enumerate(probs.tolist()):
            ex = examples[k + i]
            if task == "multiple_choice":
                p = p[: len(ex.choices)]
                names = [str(j) for j in range(len(p))]
            else:
                names = labels
            j = max(range(len(p)), key=p.__getitem__)
            out.append(Prediction(names[j], p[j], dict(zip(names, p)), ex.choices[j] if ex.choices else None))
    return out
