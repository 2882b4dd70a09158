"""Serving throughput: aggregate generated tokens/s and time to first token at 1, 8 and 32 concurrent
streaming clients against `gptlab serve` (a real uvicorn process) with a GPT-2 124M model.

The model is randomly initialised (no downloads): speed does not depend on the weights' values. Every
request streams `--max-tokens` new tokens (ignore_eos, so lengths are equal) after a prompt of about
`--prompt-tokens` tokens. The in-run baseline is the 1-client row: continuous batching should give
≥ 3x its aggregate tokens/s at 8 clients.

    python benchmarks/serve.py [--preset gpt2] [--max-tokens 64] [--rounds 2] [--clients 1 8 32 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptlab.model import GPT, preset
from gptlab.run import write_run_config
from gptlab.serve.metrics import parse_metrics
from gptlab.tokenizer import gpt2_tokenizer
from gptlab.run.format import MODEL_FILE, save_model

WORDS = "the of and to in is was for on that with as by at from his an were are which this be or".split()


def make_run(path: Path, name: str) -> None:
    tok = gpt2_tokenizer()
    cfg = preset(name, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    write_run_config(path, cfg, tok)
    save_model(GPT(cfg), path / MODEL_FILE)
    print(f"model: {name} ({GPT(cfg).num_params() / 1e6:.0f}M params, random init), context {cfg.block_size}")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(h: httpx.AsyncClient, url: str, i: int, a) -> tuple[float, int, float]:
    """-> (time to first token, tokens generated, total seconds); raises on any error."""
    prompt = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(a.prompt_tokens))
    body = {"model": "bench", "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0.8, "seed": i,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with h.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens, time.perf_counter() - t0


async def phase(url: str, clients: int, a) -> dict:
    errors, results = 0, []

    async def client(c: int):
        nonlocal errors
        for k in range(a.rounds):
            try:
                results.append(await one_request(h, url, c * 1000 + k, a))
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors += 1
                print(f"  error: {e}", file=sys.stderr)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 50) if ttfts else float("nan"),
            "ttft_p95": percentile(ttfts, 95) if ttfts else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 1])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--dtype", default=None, help="server compute dtype (fp32 | bf16) [default: fp32]")
    ap.add_argument("--threads", type=int, default=None, help="server OMP_NUM_THREADS [default: all cores]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "bench"
        make_run(run, a.preset)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        if a.threads:
            env["OMP_NUM_THREADS"] = str(a.threads)
        cmd = [sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port), "--log-level", "warning",
               "--max-batch", str(max(a.clients)), "--max-queue", str(4 * max(a.clients))]
        if a.dtype:
            cmd += ["--dtype", a.dtype]
        proc = subprocess.Popen(cmd, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit("server exited")
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            asyncio.run(phase(url, 1, argparse.Namespace(**{**vars(a), "rounds": 1, "max_tokens": 4})))  # warm-up
            print(f"{a.max_tokens} new tokens per request after ~{a.prompt_tokens} prompt tokens, {a.rounds} "
                  f"requests per client, streaming, torch threads {a.threads or os.cpu_count()}")
            print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens':>7} {'wall s':>7} {'tok/s':>8} "
                  f"{'TTFT p50':>9} {'TTFT p95':>9}")
            rows = []
            for c in a.clients:
                r = asyncio.run(phase(url, c, a))
                rows.append(r)
                print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['tokens']:>7} {r['wall_s']:>7.1f} "
                      f"{r['tok_s']:>8.1f} {r['ttft_p50']:>8.3f}s {r['ttft_p95']:>8.3f}s")
            m = parse_metrics(httpx.get(url + "/metrics").text)
            print(f"server: peak batch {m['gptlab_batch_rows_peak']:.0f} rows, "
                  f"{m['gptlab_decode_steps_total']:.0f} decode steps")
            singles = [r["tok_s"] for r in rows if r["clients"] == 1]
            if singles:  # list 1 twice (e.g. --clients 1 8 32 1) to see how much the machine's load drifted
                base = sum(singles) / len(singles)
                for r in rows:
                    if r["clients"] != 1:
                        print(f"aggregate tok/s at {r['clients']} clients = {r['tok_s'] / base:.2f}x "
                              f"the 1-client baseline" + (" (target >= 3x)" if r["clients"] == 8 else ""))
            print("errors:", sum(r["errors"] for r in rows))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
