"""Labelled examples from JSONL, JSON, CSV or TSV files: one reader for fine-tuning and evaluation."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gptlab.errors import GptlabError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GptlabError(f"{path}: invalid UTF-8 at line {line} (byte {e.start}); convert the file to UTF-8") from None


def read_rows(path: str | Path, fmt: str | None = None) -> list[dict]:
    """Rows of a JSONL, JSON (a list of objects, or {"data": [...]}), CSV or TSV file (format from the
    suffix unless `fmt` says) as dicts; delimited files need a header line. Each row records its `_line`.
    A Hugging Face dataset (a `save_to_disk` folder, or hf:NAME[:CONFIG]) reads through `hf_rows`."""
    from gptlab.data.hf_rows import is_hf_source, read_hf_rows

    if fmt is None and is_hf_source(path):
        return read_hf_rows(path)
    p = Path(path)
    fmt = fmt or FORMATS.get(p.suffix.lower())
    if fmt not in ("jsonl", "json", "csv", "tsv"):
        raise GptlabError(f"{p}: unknown data format {p.suffix or '(no suffix)'!r}; use .jsonl, .json, .csv or .tsv")
    if not p.is_file():
        raise GptlabError(f"data file not found: {p}")
    text = _decode(p.read_bytes(), p)
    rows: list[dict] = []
    if fmt == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        found = obj if isinstance(obj, list) else next(
            (obj[k] for k in ("data", "examples", "rows") if isinstance(obj, dict) and isinstance(obj.get(k), list)), None)
        if found is None or not all(isinstance(r, dict) for r in found):
            raise GptlabError(f"{p}: expected a JSON list of objects (or {{\"data\": [...]}})")
        rows = [{**r, "_line": i} for i, r in enumerate(found, 1)]
    elif fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptlabError(f"{p}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise GptlabError(f"{p}: line {n} is a JSON {type(obj).__name__}, expected an object of fields")
            obj["_line"] = n
            rows.append(obj)
    else:
        kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else dict(delimiter=",")
        reader = csv.reader(io.StringIO(text, newline=""), **kw)
        try:
            header = None
            for rec in reader:
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue  # blank line
                if header is None:
                    header = [h.strip() for h in rec]
                    if len(set(header)) != len(header):
                        raise GptlabError(f"{p}: the header line repeats a column name: {header}")
                    continue
                if len(rec) != len(header):
                    raise GptlabError(f"{p}: line {reader.line_num} has {len(rec)} fields, the header has "
                                      f"{len(header)} ({', '.join(header)})")
                row = dict(zip(header, rec))
                row["_line"] = reader.line_num
                rows.append(row)
        except csv.Error as e:
            raise GptlabError(f"{p}: malformed {fmt.upper()} at line {reader.line_num}: {e}") from None
    if not rows:
        raise GptlabError(f"{p}: no examples (the file is empty{' or has only a header' if fmt != 'jsonl' else ''})")
    return rows


