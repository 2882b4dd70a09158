"""Rows of a Hugging Face dataset for the chat readers (sft, prepare with an omni tokenizer): a folder that
`Dataset.save_to_disk` wrote, or `hf:NAME[:CONFIG]` (from the hub cache; nothing is downloaded offline).

Image and Audio columns are read undecoded ({"bytes", "path"}) and become content parts that Pillow and
soundfile decode, like files named in JSONL, so `datasets` needs no audio backend. Media placeholders follow
TRL's vision layout: a part {"type": "image"} (or "audio") without data takes the row's next item from the
`images` (`audios`) column, or its single `image` (`audio`) column. Parts whose struct holds the media
itself ({"type": "image", "image": <Image>}) work too. Arrow gives every part every field of the struct;
fields that are None are dropped."""

from __future__ import annotations

from pathlib import Path

from gptlab.errors import GptlabError

MEDIA = ("image", "audio")


def is_hf_source(src) -> bool:
    """`hf:NAME[:CONFIG]`, or a folder written by `save_to_disk` (a Dataset or a DatasetDict)."""
    if isinstance(src, str) and src.startswith("hf:"):
        return True
    p = Path(src)
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def read_hf_rows(src, split: str = "train") -> list[dict]:
    """-> rows as dicts (media as parts with bytes or a path), each with `_line` = its row number from 1."""
    try:
        import datasets
    except ImportError:
        raise GptlabError(f"{src}: Hugging Face datasets need `pip install gptlab[hf]`") from None
    name = str(src)
    try:
        if name.startswith("hf:"):
            dataset, _, config = name[3:].partition(":")
            ds = datasets.load_dataset(dataset, config or None, split=split)
        else:
            ds = datasets.load_from_disk(name)
    except Exception as e:  # missing files, offline hub, bad config: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{name}: cannot load the dataset: {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise GptlabError(f"{name}: no {split!r} split (splits: {', '.join(ds)})")
        ds = ds[split]
    ds = ds.cast(_undecoded(ds.features, datasets))
    if len(ds) == 0:
        raise GptlabError(f"{name}: the dataset has no rows")
    return [{**_fill_placeholders(row, f"{name} row {i}"), "_line": i} for i, row in enumerate(ds, 1)]


def _undecoded(feature, datasets):
    """The same features with every Image/Audio left as {"bytes", "path"} (decoded by gptlab, not datasets)."""
    if isinstance(feature, (datasets.Image, datasets.Audio)):
        return type(feature)(decode=False)
    if isinstance(feature, (dict, datasets.Features)):
        return type(feature)({k: _undecoded(v, datasets) for k, v in feature.items()})
    if isinstance(feature, list):
        return [_undecoded(f, datasets) for f in feature]
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return type(feature)(_undecoded(feature.feature, datasets))
    if isinstance(feature, datasets.Sequence):
        return datasets.Sequence(_undecoded(feature.feature, datasets), length=feature.length)
    return feature


def _media(kind: str, value, where: str) -> dict:
    """An undecoded Image/Audio value (or raw bytes, or a path) -> a content part gptlab loads."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return {"type": kind, "bytes": value["bytes"]}
    if isinstance(value, dict) and value.get("path"):
        return {"type": kind, "path": value["path"]}
    if isinstance(value, (bytes, bytearray)):
        return {"type": kind, "bytes": bytes(value)}
    if isinstance(value, str) and value:
        return {"type": kind, "path": value}
    raise GptlabError(f"{where}: an {kind} value holds neither bytes nor a path")


def _fill_placeholders(row: dict, where: str) -> dict:
    pools = {}
    for kind in MEDIA:
        many, one = row.get(kind + "s"), row.get(kind)
        pools[kind] = list(many) if isinstance(many, list) else ([one] if one is not None else [])
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        return row
    out = []
    for m, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            out.append(msg)
            continue
        parts = []
        for k, part in enumerate(msg["content"]):
            part = {key: v for key, v in part.items() if v is not None} if isinstance(part, dict) else part
            kind = part.get("type") if isinstance(part, dict) else None
            at = f"{where} message {m} part {k}"
            if kind in MEDIA and kind in part:
                part = _media(kind, part[kind], at)
            elif kind in MEDIA and "path" not in part and "bytes" not in part:
                if not pools[kind]:
                    raise GptlabError(f"{at}: an {kind} placeholder, but the row's {kind}s column has no "
                                      f"{kind} left for it")
                part = _media(kind, pools[kind].pop(0), at)
            parts.append(part)
        out.append({**{k: v for k, v in msg.items() if v is not None}, "content": parts})
    left = {kind: len(pool) for kind, pool in pools.items() if pool}
    if left:  # media that no part places would be silently dropped
        kind, n = next(iter(left.items()))
        raise GptlabError(f"{where}: {n} {kind}(s) in the row that no {{\"type\": \"{kind}\"}} part places")
    return {**row, "messages": out}
