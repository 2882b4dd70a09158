"""`gptlab chat`: multi-turn chat with a run in the terminal."""

from __future__ import annotations

import sys

from gptlab.generate.cli import add_sampling_args, sampling_params


def cmd_chat(a) -> None:
    from gptlab.chat import CHAT_TOKENS, ensure_chat_tokens, run_chat
    from gptlab.generate import Generator
    from gptlab.run import load_run

    run = load_run(a.run_dir, device=a.device)
    if not all(t in run.tokenizer.special_tokens for t in CHAT_TOKENS):
        print("warning: this run was not fine-tuned for chat (no chat tokens); replies may ramble until "
              "--max-new-tokens", file=sys.stderr)
    tok = ensure_chat_tokens(run.tokenizer, run.model)  # before the Generator: may grow the embeddings
    gen = Generator(run.model, tok, dtype=a.dtype)
    run_chat(gen, tok, run.model.cfg.block_size, sampling_params(a), system=a.system, media_dir=a.media_dir)


def register(sub) -> None:
    c = sub.add_parser("chat", help="multi-turn chat (commands: /reset, /system TEXT, /quit)")
    c.add_argument("run_dir")
    c.add_argument("--system", help="system message")
    c.add_argument("--media-dir", default="chat_media", help="omni models: where image and audio replies are saved")
    add_sampling_args(c, temperature=0.7, max_new=256)
    c.set_defaults(func=cmd_chat)
