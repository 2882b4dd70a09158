"""`gptlab serve RUN_DIR`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse

from gptlab.config import add_dtype_arg


def cmd_serve(a) -> None:
    from gptlab.serve import serve
    from gptlab.serve.adapters import parse_lora_args

    mod = a.moderation or None
    serve(a.run_dir, host=a.host, port=a.port, log_level=a.log_level, api_keys=tuple(a.api_key or ()),
          max_batch=a.max_batch, max_queue=a.max_queue, moderation=mod, dtype=a.dtype, device=a.device,
          model_name=a.model_name, moderation_action=a.moderation_action, moderation_label=a.moderation_label,
          moderation_threshold=a.moderation_threshold, cors_origins=tuple(a.cors_origin or ()),
          prefix_cache_mb=a.prefix_cache_mb, draft=a.draft, speculative_tokens=a.speculative_tokens,
          chat_template=a.chat_template, lora=parse_lora_args(a.lora))


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, batching) "
                                     "with a web chat page at /")
    p.add_argument("run_dir", help="run directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [default: 127.0.0.1, this machine only]")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="accepted Bearer token (repeatable; GPTLAB_API_KEYS adds comma-separated ones); "
                        "none given: no authentication")
    p.add_argument("--model-name", help="model id clients send [default: the run directory's name]")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together [default: 32]")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a batch slot; beyond it: 503 + Retry-After [default: 64]")
    add_dtype_arg(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--moderation", action="append", metavar="PATH",
                   help="blocklist file (one term a line) or classifier run dir from `gptlab finetune` (repeatable)")
    p.add_argument("--moderation-action", choices=["redact", "refuse"], default="redact",
                   help="blocklisted output terms: replace with [redacted], or end the choice [default: redact]")
    p.add_argument("--moderation-label", help="classifier label that means 'flag' [default: unsafe/harmful/toxic/...]")
    p.add_argument("--moderation-threshold", type=float, default=0.5, help="classifier flag probability [default: 0.5]")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or * for any) call the API from a "
                        "browser (repeatable) [default: none]")
    p.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="memory for the KV of prompt prefixes seen before (shared system prompts, earlier chat "
                        "turns), reused instead of prefilled again; 0: off [default: 1024]")
    p.add_argument("--chat-template", metavar="FILE|TEMPLATE",
                   help="a Jinja chat template (Hugging Face's chat_template), as a file or its text, instead of "
                        "gptlab's; a run imported from Hugging Face uses the template it came with by default")
    p.add_argument("--draft", metavar="RUN_DIR",
                   help="speculative decoding: a smaller run with the same tokenizer drafts tokens that the model "
                        "verifies in one pass (greedy output unchanged, sampling distributed as without)")
    p.add_argument("--speculative-tokens", type=int, default=4, help="tokens the draft proposes a round [default: 4]")
    p.add_argument("--lora", action="append", metavar="NAME=DIR",
                   help="serve a LoRA adapter (a run trained with --lora.r, or a PEFT adapter dir) over the run as "
                        "model NAME (repeatable); requests for different adapters share one batch")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def register(sub) -> None:
    add_serve_parser(sub)
