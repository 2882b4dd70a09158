"""`gptlab prepare`: a corpus into train/val token shards."""

from __future__ import annotations


def cmd_prepare(a) -> None:
    from gptlab.data.prepare import prepare

    prepare(a.source, a.out, tokenizer=a.tokenizer, val_fraction=a.val_fraction, seed=a.seed,
            num_workers=a.workers, text_field=a.text_field)


def register(sub) -> None:
    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    pr.add_argument("source", help="text file, folder, .jsonl, hf:NAME[:CONFIG] or 'shakespeare' (built-in)")
    pr.add_argument("--out", required=True, help="data directory to write")
    pr.add_argument("--tokenizer", default="gpt2", help="gpt2 | char | bpe:N (train N merges) | path to a tokenizer")
    pr.add_argument("--val-fraction", type=float, default=0.1)
    pr.add_argument("--seed", type=int, default=1337)
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count, ≤ 8)")
    pr.add_argument("--text-field", default="text", help="JSONL / datasets field holding the text")
    pr.set_defaults(func=cmd_prepare)
