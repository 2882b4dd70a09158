"""Server metrics in the Prometheus text exposition format (version 0.0.4), no client library needed.

Updated from the engine thread and the HTTP handlers, so every update holds one lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.waiting = self.batch_rows = self.peak_batch_rows = 0
        self.prompt_tokens = self.generation_tokens = self.cached_tokens = 0
        self.draft_tokens = self.accepted_tokens = 0
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.cancelled = self.rejected = 0
        self.moderation: dict[tuple[str, str, str], int] = {}  # (stage, action, source) -> count
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum, self.ttft_n = 0.0, 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per decode step, for tokens/s
        self.decode_steps = 0

    # --- updates ---------------------------------------------------------------------------------
    def set_load(self, running: int, waiting: int, batch_rows: int) -> None:
        with self.lock:
            self.running, self.waiting, self.batch_rows = running, waiting, batch_rows
            self.peak_batch_rows = max(self.peak_batch_rows, batch_rows)

    def add_prompt_tokens(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def add_cached_tokens(self, n: int) -> None:
        with self.lock:
            self.cached_tokens += n

    def add_drafts(self, proposed: int, accepted: int) -> None:
        with self.lock:
            self.draft_tokens += proposed
            self.accepted_tokens += accepted

    def add_step(self, tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += tokens
            self.decode_steps += 1
            self.recent.append((now, tokens))
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            i = next((k for k, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds
            self.ttft_n += 1

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def count_cancelled(self) -> None:
        with self.lock:
            self.cancelled += 1

    def count_rejected(self) -> None:
        with self.lock:
            self.rejected += 1

    def count_moderation(self, stage: str, action: str, source: str) -> None:
        with self.lock:
            key = (stage, action, source)
            self.moderation[key] = self.moderation.get(key, 0) + 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            toks = sum(n for t, n in self.recent if t >= now - RATE_WINDOW_S)
            if not toks:
                return 0.0
            span = max(now - self.recent[0][0], 1e-3)
        return toks / min(span, RATE_WINDOW_S)

    # --- exposition ------------------------------------------------------------------------------
    def render(self) -> str:
        tps = self.tokens_per_second()
        with self.lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

            metric("gptlab_requests_running", "gauge", "Requests with rows in the decode batch.", [("", self.running)])
            metric("gptlab_requests_waiting", "gauge", "Requests queued for admission.", [("", self.waiting)])
            metric("gptlab_batch_rows", "gauge", "Rows (choices) in the decode batch.", [("", self.batch_rows)])
            metric("gptlab_batch_rows_peak", "gauge", "Largest decode batch so far.", [("", self.peak_batch_rows)])
            metric("gptlab_prompt_tokens_total", "counter", "Prompt tokens prefilled (not those from the prefix cache).", [("", self.prompt_tokens)])
            metric("gptlab_prefix_cache_hit_tokens_total", "counter", "Prompt tokens whose KV came from the prefix "
                   "cache instead of a forward pass.", [("", self.cached_tokens)])
            metric("gptlab_spec_decode_draft_tokens_total", "counter", "Tokens the draft model proposed.",
                   [("", self.draft_tokens)])
            metric("gptlab_spec_decode_accepted_tokens_total", "counter", "Proposed tokens the model accepted.",
                   [("", self.accepted_tokens)])
            metric("gptlab_generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("gptlab_decode_steps_total", "counter", "Batched decode steps.", [("", self.decode_steps)])
            metric("gptlab_generation_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.", [("", round(tps, 3))])
            cum, buckets = 0, []
            for b, c in zip((*TTFT_BUCKETS, float("inf")), self.ttft_counts):
                cum += c
                buckets.append((f'_bucket{{le="{"+Inf" if b == float("inf") else _num(b)}"}}', cum))
            out.append("# HELP gptlab_time_to_first_token_seconds Time from request arrival to its first token.")
            out.append("# TYPE gptlab_time_to_first_token_seconds histogram")
            out.extend(f"gptlab_time_to_first_token_seconds{s} {_num(v)}" for s, v in buckets)
            out.append(f"gptlab_time_to_first_token_seconds_sum {_num(self.ttft_sum)}")
            out.append(f"gptlab_time_to_first_token_seconds_count {self.ttft_n}")
            metric("gptlab_http_requests_total", "counter", "HTTP responses by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("gptlab_requests_cancelled_total", "counter", "Generations stopped because the client left.",
                   [("", self.cancelled)])
            metric("gptlab_requests_rejected_total", "counter", "Requests refused with 503 (queue full).",
                   [("", self.rejected)])
            metric("gptlab_moderation_actions_total", "counter", "Moderation filter actions.",
                   [(f'{{stage="{st}",action="{a}",source="{so}"}}', n)
                    for (st, a, so), n in sorted(self.moderation.items())])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (tests and benchmarks read /metrics with it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
