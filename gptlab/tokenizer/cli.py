"""`gptlab tokenizer train|encode|decode`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptlab.errors import GptlabError


def cmd_tokenizer(a) -> None:
    from gptlab.tokenizer import build_tokenizer, load_tokenizer

    if a.tok_cmd == "train":
        from gptlab.data.sources import iter_documents

        spec = "char" if a.kind == "char" else ("gpt2" if a.kind == "gpt2" else f"bpe:{a.merges}")
        tok = build_tokenizer(spec, list(iter_documents(a.input, text_field=a.text_field)))
        out = Path(a.out)
        tok.save(out)
        print(f"saved {tok.kind} tokenizer with {tok.vocab_size:,} tokens to {out}")
    elif a.tok_cmd == "encode":
        tok = load_tokenizer(a.tokenizer)
        text = a.text if a.text is not None else sys.stdin.read()
        print(" ".join(map(str, tok.encode(text))))
    else:
        tok = load_tokenizer(a.tokenizer)
        raw = a.ids if a.ids else sys.stdin.read().split()
        try:
            ids = [int(t) for t in raw]
        except ValueError:
            raise GptlabError("decode expects integer token ids") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise GptlabError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
        sys.stdout.write(tok.decode(ids) + "\n")


def register(sub) -> None:
    t = sub.add_parser("tokenizer", help="train, or encode/decode with, a tokenizer")
    tsub = t.add_subparsers(dest="tok_cmd", required=True)
    tt = tsub.add_parser("train", help="build a tokenizer from a corpus (byte-level BPE, char) or the GPT-2 BPE")
    tt.add_argument("input", help="corpus: file, folder, .jsonl, hf:NAME or 'shakespeare'")
    tt.add_argument("--out", required=True, help="tokenizer file to write (tokenizer.gptlab.json)")
    tt.add_argument("--kind", choices=["bpe", "char", "gpt2"], default="bpe")
    tt.add_argument("--merges", type=int, default=8000, help="BPE merges (GPT-1 used 40,000)")
    tt.add_argument("--text-field", default="text", help="JSONL field holding the text")
    te = tsub.add_parser("encode", help="print token ids of --text (or stdin)")
    te.add_argument("tokenizer", help="tokenizer file, run dir or data dir")
    te.add_argument("--text")
    td = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    td.add_argument("tokenizer")
    td.add_argument("ids", nargs="*")
    t.set_defaults(func=cmd_tokenizer)
