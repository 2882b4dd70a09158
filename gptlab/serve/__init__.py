"""OpenAI-compatible serving: FastAPI routes over a continuous-batching KV-cache engine, with API keys,
moderation, Prometheus metrics and a web chat page (`gptlab serve RUN_DIR`)."""

from __future__ import annotations

import logging


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
