"""OpenAI-compatible serving: FastAPI routes over a continuous-batching KV-cache engine, with API keys,
moderation, Prometheus metrics and a web chat page (`gptlab serve RUN_DIR`)."""
