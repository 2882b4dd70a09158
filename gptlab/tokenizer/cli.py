"""`gptlab tokenizer train|encode|decode`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptlab.errors import GptlabError


def cmd_tokenizer(a) -> None:
    from gptlab.tokenizer import build_tokenizer, load_tokenizer

    if a.tok_cmd == "train" and a.kind in ("image", "audio", "omni"):
        train_media_tokenizer(a)
    elif a.tok_cmd == "train":
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


def train_media_tokenizer(a) -> None:
    """--kind image|audio: a codec learned from a folder or manifest of files; --kind omni: the one vocabulary
    of a chat JSONL's text (characters) with the given image and/or audio tokenizers."""
    from gptlab.omni import media
    from gptlab.tokenizer import CharTokenizer, Codec, MelAudioCodec, OmniTokenizer, PatchImageCodec, load_tokenizer
    from gptlab.chat.template import CHAT_TOKENS

    if a.kind == "image":
        files = media.media_files(a.input, media.IMAGE_EXTS)
        tok = PatchImageCodec.train([media.load_image(f) for f in files], size=a.size, patch=a.patch, codes=a.codes,
                                    channels=a.channels)
        what = f"{tok.n_codes} codes, {tok.tokens_per_item} tokens per image, from {len(files)} images"
    elif a.kind == "audio":
        files = media.media_files(a.input, media.AUDIO_EXTS)
        tok = MelAudioCodec.train([media.load_audio(f) for f in files], codes=a.codes)
        what = f"{tok.n_codes} codes, {tok.codes_per_second:g} per second, from {len(files)} files"
    else:
        import json

        if not (a.image or a.audio):
            raise GptlabError("--kind omni needs --image and/or --audio tokenizer files")
        rows = [json.loads(ln) for ln in Path(a.input).read_text().splitlines() if ln.strip()]
        texts = [p["text"] for r in rows for m in r.get("messages", []) if isinstance(m.get("content"), list)
                 for p in m["content"] if p.get("type") == "text"]
        texts += [m["content"] for r in rows for m in r.get("messages", []) if isinstance(m.get("content"), str)]
        text = CharTokenizer.from_texts([*texts, "\n"]).with_special_tokens(CHAT_TOKENS)
        tok = OmniTokenizer(text, load_tokenizer(a.image, Codec) if a.image else None,
                            load_tokenizer(a.audio, Codec) if a.audio else None)
        what = f"{text.vocab_size} text ids + media codes + 4 markers"
    out = tok.save(a.out)
    print(f"saved {tok.kind} tokenizer ({what}) to {out}")


def register(sub) -> None:
    t = sub.add_parser("tokenizer", help="train, or encode/decode with, a tokenizer")
    tsub = t.add_subparsers(dest="tok_cmd", required=True)
    tt = tsub.add_parser("train", help="build a tokenizer from a corpus (byte-level BPE, char) or the GPT-2 BPE")
    tt.add_argument("input", help="corpus: file, folder, .jsonl, hf:NAME or 'shakespeare'; --kind image|audio: a "
                                  "folder or manifest of files; --kind omni: a chat JSONL with content parts")
    tt.add_argument("--out", required=True, help="tokenizer file to write (tokenizer.gptlab.json)")
    tt.add_argument("--kind", choices=["bpe", "char", "gpt2", "image", "audio", "omni"], default="bpe")
    tt.add_argument("--codes", type=int, default=512, help="image/audio: codebook size")
    tt.add_argument("--size", type=int, default=8, help="image: side images are resized to")
    tt.add_argument("--patch", type=int, default=2, help="image: patch side (tokens per image = (size/patch)²)")
    tt.add_argument("--channels", type=int, choices=[1, 3], default=1, help="image: 1 grey, 3 colour")
    tt.add_argument("--image", help="omni: an image tokenizer file")
    tt.add_argument("--audio", help="omni: an audio tokenizer file")
    tt.add_argument("--merges", type=int, default=8000, help="BPE merges (GPT-1 used 40,000)")
    tt.add_argument("--text-field", default="text", help="JSONL field holding the text")
    te = tsub.add_parser("encode", help="print token ids of --text (or stdin)")
    te.add_argument("tokenizer", help="tokenizer file, run dir or data dir")
    te.add_argument("--text")
    td = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    td.add_argument("tokenizer")
    td.add_argument("ids", nargs="*")
    t.set_defaults(func=cmd_tokenizer)
