"""Fine-tuning data: JSONL, CSV or TSV rows -> task examples, through a field mapping.

Every format is read as a list of rows (field name -> value): JSONL one object per line, CSV and TSV with
a header line. TSV is read without quoting (the GLUE layout: SST-2's `label<TAB>sentence` works as is);
CSV uses standard double-quote quoting. Which fields hold what is a mapping (`Fields`); unset names are
looked up among the usual column names of each task (SST-2 `sentence`, MNLI `premise`/`hypothesis`,
MRPC `sentence1`/`sentence2`, ...). Bad input is a one-line GptlabError.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from gptlab.data.records import read_rows  # noqa: F401  (part of this module's API)
from gptlab.errors import GptlabError

TASKS = ("classification", "entailment", "similarity", "multiple_choice")

# field role -> candidate column names tried in order when the role's field is not given
_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "classification": {"text": ("text", "sentence"), "label": ("label",)},
    "entailment": {"text": ("premise", "sentence1", "text"), "text2": ("hypothesis", "sentence2", "text2"),
                   "label": ("label",)},
    "similarity": {"text": ("sentence1", "text", "text1", "question1"), "text2": ("sentence2", "text2", "question2"),
                   "label": ("label",)},
    "multiple_choice": {"context": ("context", "text", "question", "story"), "choices": ("choices", "endings", "options"),
                        "label": ("label", "answer")},
}
_ROLE_FLAG = {"text": "--text-field", "text2": "--text2-field", "context": "--context-field",
              "choices": "--choices-field", "label": "--label-field"}


@dataclass(frozen=True)
class Fields:
    """Column names of each role (None: look the usual names up). `choices` is one field holding a list
    (JSONL, or a JSON array in a CSV/TSV cell) or several comma-separated columns, one choice each."""
    text: str | None = None      # classification text; entailment premise; similarity sentence 1
    text2: str | None = None     # entailment hypothesis; similarity sentence 2
    context: str | None = None   # multiple choice: the shared context (story, passage + question)
    choices: str | None = None   # multiple choice: the candidate answers
    label: str | None = None     # class name, or the index (0-based) or text of the right choice

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """One task example. text: the text / premise / sentence 1 / context; text2: hypothesis / sentence 2;
    choices: multiple-choice answers; label: the raw label string (None when the data has no labels)."""
    text: str
    text2: str | None = None
    choices: tuple[str, ...] = ()
    label: str | None = None


def check_task(task: str) -> str:
    if task not in TASKS:
        raise GptlabError(f"unknown task type {task!r}; choose from {', '.join(TASKS)}")
    return task


# rows are read by gptlab.data.records (shared with evaluation)


# --- rows -> examples ------------------------------------------------------------------------------
def resolve_fields(task: str, rows: list[dict], fields: Fields | None = None, need_label: bool = True,
                   where: str = "data") -> Fields:
    """Fill unset field names from the usual column names; a name that is absent is an error."""
    check_task(task)
    fields = fields or Fields()
    present = {k for r in rows[:1] for k in r if k != "_line"}
    out = {}
    for role, candidates in _DEFAULTS[task].items():
        given = getattr(fields, role) or (fields.text if role == "context" else None)
        if role == "choices" and given and "," in given:
            missing = [c for c in given.split(",") if c.strip() not in present]
            if missing:
                raise GptlabError(f"{where}: no column {missing[0]!r} for {_ROLE_FLAG[role]} "
                                  f"(columns: {', '.join(sorted(present))})")
            out[role] = ",".join(c.strip() for c in given.split(","))
            continue
        if given:
            if given not in present:
                if role == "label" and not need_label:
                    out[role] = None
                    continue
                raise GptlabError(f"{where}: no field {given!r} for {_ROLE_FLAG[role]} (fields: {', '.join(sorted(present))})")
            out[role] = given
            continue
        found = next((c for c in candidates if c in present), None)
        if found is None and not (role == "label" and not need_label):
            raise GptlabError(f"{where}: no {role} field for a {task} task (looked for {', '.join(candidates)}; "
                              f"fields: {', '.join(sorted(present))}); name it with {_ROLE_FLAG[role]}")
        out[role] = found
    return Fields(**out)


def _text(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise GptlabError(f"{where}: line {row.get('_line', '?')} has no field {name!r}")
    v = row[name]
    if not isinstance(v, str):
        if v is None or isinstance(v, (dict, list)):
            raise GptlabError(f"{where}: line {row.get('_line', '?')}: field {name!r} must be text, got {json.dumps(v)[:40]}")
        v = str(v)
    if not v.strip():  # nothing to classify: a label learned from an empty input is noise
        raise GptlabError(f"{where}: line {row.get('_line', '?')}: field {name!r} is empty; remove the row")
    return v


def _choices(row: dict, name: str, where: str) -> tuple[str, ...]:
    line = row.get("_line", "?")
    if "," in name:
        return tuple(_text(row, c, where) for c in name.split(","))
    v = row.get(name)
    if isinstance(v, str):  # a JSON array in a CSV/TSV cell
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise GptlabError(f"{where}: line {line}: field {name!r} must be a list of choices (a JSON array in "
                              "CSV/TSV), or name one column per choice: --choices-field a,b,c") from None
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, (str, int, float)) for c in v):
        raise GptlabError(f"{where}: line {line}: field {name!r} must be a list of at least 2 text choices")
    return tuple(str(c) for c in v)


def _label_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, (dict, list)):
        raise ValueError
    s = str(v).strip()
    try:  # "1.0" in a CSV and 1.0 in JSON name the same class as "1"
        f = float(s)
        return str(int(f)) if f.is_integer() and s.lower() not in ("inf", "nan") else s
    except ValueError:
        return s


def rows_to_examples(task: str, rows: list[dict], fields: Fields, where: str = "data") -> list[Example]:
    """Examples of a resolved field mapping (see resolve_fields); label None where the field is unset."""
    out = []
    for row in rows:
        try:
            label = _label_str(row.get(fields.label)) if fields.label else None
        except ValueError:
            raise GptlabError(f"{where}: line {row.get('_line', '?')}: label must be a string or number") from None
        if fields.label and (label is None or label == ""):
            raise GptlabError(f"{where}: line {row.get('_line', '?')} has no label in field {fields.label!r}")
        if task == "multiple_choice":
            out.append(Example(_text(row, fields.context, where), choices=_choices(row, fields.choices, where), label=label))
        elif task == "classification":
            out.append(Example(_text(row, fields.text, where), label=label))
        else:
            out.append(Example(_text(row, fields.text, where), _text(row, fields.text2, where), label=label))
    return out


def load_examples(path: str | Path, task: str, fields: Fields | None = None, need_label: bool = True,
                  fmt: str | None = None) -> tuple[list[Example], Fields]:
    """Read a data file into examples of `task` -> (examples, the resolved field mapping)."""
    check_task(task)
    rows = read_rows(path, fmt)
    resolved = resolve_fields(task, rows, fields, need_label=need_label, where=str(path))
    return rows_to_examples(task, rows, resolved, str(path)), resolved


# --- labels and splits -----------------------------------------------------------------------------
def label_names(examples: list[Example]) -> list[str]:
    """Class names in sorted order (numerically when every label is an integer): id = position."""
    names = {ex.label for ex in examples if ex.label is not None}
    if not names:
        raise GptlabError("the training data has no labels")
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def label_ids(task: str, examples: list[Example], labels: list[str] | None, where: str = "data") -> list[int]:
    """Class ids (position in `labels`) or, for multiple choice, the index of the right choice."""
    out = []
    index = {n: i for i, n in enumerate(labels or [])}
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise GptlabError(f"{where}: example {i + 1} has no label")
        if task == "multiple_choice":
            if _is_int(ex.label) and 0 <= int(ex.label) < len(ex.choices):
                out.append(int(ex.label))
            elif ex.label in ex.choices:
                out.append(ex.choices.index(ex.label))
            else:
                raise GptlabError(f"{where}: example {i + 1}: label {ex.label!r} is neither a choice index "
                                  f"(0..{len(ex.choices) - 1}) nor one of its choices")
        else:
            if ex.label not in index:
                raise GptlabError(f"{where}: example {i + 1} has label {ex.label!r}, not one of the training "
                                  f"labels {labels}")
            out.append(index[ex.label])
    return out


def split_dev(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random dev split -> (train, dev), each in file order. fraction 0 -> no dev set."""
    if not 0.0 <= fraction < 1.0:
        raise GptlabError(f"--dev-fraction must be in [0, 1), got {fraction}")
    n_dev = round(len(examples) * fraction)
    if fraction > 0 and n_dev == 0:
        n_dev = 1
    if n_dev >= len(examples):
        raise GptlabError(f"cannot split a dev set of {n_dev} off {len(examples)} examples; pass --dev FILE or more data")
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    dev = set(idx[:n_dev])
    return [e for i, e in enumerate(examples) if i not in dev], [e for i, e in enumerate(examples) if i in dev]
