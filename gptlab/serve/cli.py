"""`gptlab serve RUN_DIR`: the OpenAI-compatible server (parser with set_defaults(func=...))."""

from __future__ import annotations

import argparse
import logging

from gptlab.config import add_dtype_arg


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **opts) -> None:
    """Run the server in this process until interrupted; `opts` are create_app's keyword options."""
    try:
        import uvicorn
    except ImportError:
        from gptlab.errors import GptlabError

        raise GptlabError("serving needs FastAPI and uvicorn: pip install 'gptlab[serve]'") from None
    from gptlab.run import read_run_config
    from gptlab.serve.app import create_app
    from gptlab.serve.moderation import Moderator

    read_run_config(run_dir)  # a wrong path is a one-line error now, not a failed background load
    if opts.get("moderation") is not None and not isinstance(opts["moderation"], Moderator):
        opts["moderation"] = Moderator.from_paths(opts["moderation"], opts.get("moderation_action", "redact"),
                                                  opts.get("moderation_label"), opts.get("moderation_threshold", 0.5))
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(run_dir, **opts)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _cmd_serve(a) -> None:
    mod = a.moderation or None
    serve(a.run_dir, host=a.host, port=a.port, log_level=a.log_level, api_keys=tuple(a.api_key or ()),
          max_batch=a.max_batch, max_queue=a.max_queue, moderation=mod, dtype=a.dtype, device=a.device,
          model_name=a.model_name, moderation_action=a.moderation_action, moderation_label=a.moderation_label,
          moderation_threshold=a.moderation_threshold)


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)
    return p
