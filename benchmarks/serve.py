"""Serving speed against `gptlab serve` (real uvicorn processes), each figure a ratio to a baseline
measured in the same run on the same model:

- throughput: aggregate generated tokens/s and time to first token at 1, 8 and 32 concurrent streaming
  clients (GPT-2 124M, random init: speed does not depend on the weights' values); every request streams
  `--max-tokens` new tokens (ignore_eos) after ~`--prompt-tokens` tokens. Target: 8 clients ≥ 3x 1 client.
- structured: tokens/s of 8 clients whose replies follow a JSON Schema vs 8 unconstrained. Target ≤ 15% slower.
- prefix: time to first token of the 5th turn of a chat behind a ~500-token system prompt, and 16 clients
  sharing that prompt, with the prefix cache on vs off. Target: 5th turn ≥ 3x faster.
- speculative: batch-1 greedy tokens/s of a character-level model trained on tiny-shakespeare, with and
  without a ≥4x smaller draft trained on the same data (both trained here first, `gptlab pretrain`), the
  acceptance rate, and whether the outputs are identical. Target ≥ 1.5x.

    python benchmarks/serve.py [--phases throughput structured prefix speculative] [--clients 1 8 32 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from gptlab.chat.template import ensure_chat_tokens
from gptlab.model import GPT, preset
from gptlab.run import write_run_config
from gptlab.serve.metrics import parse_metrics
from gptlab.tokenizer import gpt2_tokenizer
from gptlab.run.format import MODEL_FILE, save_model

WORDS = "the of and to in is was for on that with as by at from his an were are which this be or".split()


def make_run(path: Path, name: str) -> None:
    tok = ensure_chat_tokens(gpt2_tokenizer())  # chat turns for the prefix-cache phase
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
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **getattr(a, "extra", {})}
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


@contextlib.contextmanager
def server(run: Path, *args: str, threads: int | None = None):
    """A `gptlab serve` process on a free port -> its URL; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port),
                             "--log-level", "warning", "--model-name", "bench", *args], env=env)
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
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def throughput(run: Path, a) -> None:
    """Aggregate tokens/s and TTFT at 1, 8 and 32 concurrent clients."""
    with server(run, "--max-batch", str(max(a.clients)), "--max-queue", str(4 * max(a.clients)),
                *(["--dtype", a.dtype] if a.dtype else []), threads=a.threads) as url:
        asyncio.run(phase(url, 1, argparse.Namespace(**{**vars(a), "rounds": 1, "max_tokens": 4})))  # warm-up
        print(f"\n## throughput: {a.max_tokens} new tokens per request after ~{a.prompt_tokens} prompt tokens, "
              f"{a.rounds} requests per client, streaming, torch threads {a.threads or os.cpu_count()}")
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


def structured(run: Path, a) -> None:
    schema = {"type": "object", "properties": {"words": {"type": "array", "minItems": 200,
                                                         "items": {"type": "string", "maxLength": 12}}},
              "required": ["words"], "additionalProperties": False}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "words", "schema": schema}}}
    res = {}
    with server(run, "--max-batch", "8", *(["--dtype", a.dtype] if a.dtype else []), threads=a.threads) as url:
        asyncio.run(phase(url, 8, argparse.Namespace(**{**vars(a), "rounds": 1, "max_tokens": 4, "extra": fmt})))
        for label, extra in (("free", {}), ("json_schema", fmt), ("free", {}), ("json_schema", fmt)):
            r = asyncio.run(phase(url, 8, argparse.Namespace(**{**vars(a), "extra": extra})))
            res.setdefault(label, []).append(r)
    print(f"\n## structured output: 8 clients x {a.rounds} requests, {a.max_tokens} tokens each (twice, alternating)")
    for label, rs in res.items():
        print(f"{label:>12}: {sum(r['tok_s'] for r in rs) / len(rs):8.1f} tok/s, errors {sum(r['errors'] for r in rs)}")
    free, js = (sum(r["tok_s"] for r in res[k]) / 2 for k in ("free", "json_schema"))
    print(f"json_schema: {free / js:.3f}x the time per token of free text ({100 * (free / js - 1):+.1f}%; target <= +15%)")


async def chat_turn(h: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                    gaps: list | None = None) -> tuple[float, str]:
    """A streamed greedy chat turn -> (time to first token, text); `gaps` collects, per token, the logprob
    margin of the chosen token over the runner-up (where float rounding could flip a greedy choice)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, **({"logprobs": True, "top_logprobs": 2} if gaps is not None else {})}
    t0, ttft, text = time.perf_counter(), None, ""
    async with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])
                if ch["choices"] and ch["choices"][0]["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text += ch["choices"][0]["delta"]["content"]
                for e in (ch["choices"][0].get("logprobs") or {}).get("content") or [] if ch["choices"] else []:
                    top = e["top_logprobs"]
                    gaps.append((e["token"], top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else float("inf")))
    return ttft, text


def prefix(run: Path, a) -> None:
    system = " ".join(WORDS[(k * 5) % len(WORDS)] for k in range(500))
    questions = ["What is the plan?", "And then?", "Why so?", "Where next?", "Who said that?"]
    out = {}
    for label, mb in (("off", "0"), ("on", "1024")):
        with server(run, "--prefix-cache-mb", mb, "--max-batch", "16", *(["--dtype", a.dtype] if a.dtype else []),
                    threads=a.threads) as url:
            async def conversations():
                fifth, replies, gaps = [], [], []
                async with httpx.AsyncClient(timeout=600) as h:
                    await chat_turn(h, url, [{"role": "user", "content": "warm up"}], 2)
                    for c in range(3):
                        msgs = [{"role": "system", "content": system}]
                        for k, q in enumerate(questions):
                            msgs.append({"role": "user", "content": f"{q} ({c})"})
                            gaps.append([])
                            ttft, text = await chat_turn(h, url, msgs, 24, gaps[-1])
                            msgs.append({"role": "assistant", "content": text})
                            replies.append(text)
                        fifth.append(ttft)
                    t0 = time.perf_counter()
                    shared = await asyncio.gather(*(chat_turn(h, url, [{"role": "system", "content": system},
                                                                        {"role": "user", "content": f"Question {i}"}], 32)
                                                    for i in range(16)))
                    wall = time.perf_counter() - t0
                return fifth, replies, shared, wall, gaps

            fifth, replies, shared, wall, gaps = asyncio.run(conversations())
            m = parse_metrics(httpx.get(url + "/metrics").text)
        out[label] = dict(fifth=percentile(fifth, 50), replies=replies, wall=wall, gaps=gaps,
                          ttft16=percentile([t for t, _ in shared], 50), hit=m["gptlab_prefix_cache_hit_tokens_total"],
                          tok_s=16 * 32 / wall)
    print("\n## prefix cache: 5-turn chats behind a ~500-token system prompt (24 tokens a reply), then 16 clients "
          "sharing the prompt (32 tokens each)")
    for label, r in out.items():
        print(f"cache {label:>3}: 5th-turn TTFT p50 {r['fifth']:.3f}s; 16 clients {r['tok_s']:.1f} tok/s, TTFT p50 "
              f"{r['ttft16']:.3f}s; cached prompt tokens {r['hit']:.0f}")
    same = sum(x == y for x, y in zip(out["on"]["replies"], out["off"]["replies"]))
    print(f"5th-turn TTFT {out['off']['fifth'] / out['on']['fifth']:.1f}x faster with the cache (target >= 3x); "
          f"16 clients {out['on']['tok_s'] / out['off']['tok_s']:.2f}x the tok/s; greedy replies identical: "
          f"{same} of {len(out['on']['replies'])}")
    for a_, b_ in zip(out["on"]["gaps"], out["off"]["gaps"]):  # where the first different reply departs
        k = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x[0] != y[0]), None)
        if k is not None:
            print(f"  first difference at token {k} of a reply: the greedy choice's margin over the runner-up was "
                  f"{b_[k][1]:.2e} nats without the cache, {a_[k][1]:.2e} with it (in bf16, a cached KV computed in "
                  "another prefill shape rounds differently: --dtype float32 gives identical replies)")
            break


def train(data: Path, out: Path, layers: int, embd: int, iters: int, batch: int) -> float:
    cmd = [sys.executable, "-m", "gptlab", "pretrain", "--data", str(data), "--out", str(out), "--preset", "small-4x128",
           "--model.n_layer", str(layers), "--model.n_head", str(max(2, embd // 64)), "--model.n_embd", str(embd),
           "--model.block_size", "256", "--train.block_size", "256", "--train.batch_size", str(batch),
           "--train.max_iters", str(iters), "--train.lr", "1e-3", "--train.warmup_iters", str(max(1, iters // 20)),
           "--train.min_lr_ratio", "0.1", "--train.eval_interval", str(iters), "--train.eval_iters", "10",
           "--train.log_interval", str(max(1, iters // 10)), "--train.checkpoint_interval", "0"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r][-1]
    print(f"trained {out.name}: {layers} x {embd}, {iters} iterations x {batch} x 256 chars in "
          f"{time.perf_counter() - t0:.0f} s, val loss {val:.3f}")
    return val


def speculative(tmp: Path, a) -> None:
    text = Path(a.text).read_text()
    data = tmp / "chars"
    subprocess.run([sys.executable, "-m", "gptlab", "prepare", a.text, "--out", str(data), "--tokenizer", "char",
                    "--val-fraction", "0.1"], check=True, capture_output=True)
    print("\n## speculative decoding")
    train(data, tmp / "target", *a.target)
    train(data, tmp / "draft", *a.draft)
    from gptlab.run import load_run

    sizes = [load_run(tmp / n, "cpu").model.num_params() for n in ("target", "draft")]
    val = text[int(len(text) * 0.9):]
    prompts = [val[i:i + 48] for i in range(0, 48 * 97 * 8, 48 * 97)]
    print(f"target {sizes[0] / 1e6:.1f}M params, draft {sizes[1] / 1e6:.2f}M ({sizes[0] / sizes[1]:.0f}x smaller); "
          f"{len(prompts)} prompts x {a.spec_tokens} greedy tokens, batch 1, k = {a.speculative_tokens}")
    for dtype in a.spec_dtypes:
        spec_pair(tmp, a, prompts, dtype)


def spec_pair(tmp: Path, a, prompts: list[str], dtype: str) -> None:
    out = {}
    for label, extra in (("plain", []), ("draft", ["--draft", str(tmp / "draft"), "--speculative-tokens",
                                                     str(a.speculative_tokens)])):
        with server(tmp / "target", "--dtype", dtype, *extra, threads=a.threads) as url:
            body = lambda p, n: {"model": "bench", "prompt": p, "max_tokens": n, "temperature": 0,  # noqa: E731
                                 "ignore_eos": True}
            httpx.post(url + "/v1/completions", json=body(prompts[0], 8), timeout=600)  # warm-up
            t0, texts = time.perf_counter(), []
            for p in prompts:  # batch 1: one request at a time
                texts.append(httpx.post(url + "/v1/completions", json=body(p, a.spec_tokens),
                                        timeout=600).json()["choices"][0]["text"])
            wall = time.perf_counter() - t0
            m = parse_metrics(httpx.get(url + "/metrics").text)
        acc = m["gptlab_spec_decode_accepted_tokens_total"] / max(1, m["gptlab_spec_decode_draft_tokens_total"])
        out[label] = dict(tok_s=len(prompts) * a.spec_tokens / wall, texts=texts, acc=acc)
    for label, r in out.items():
        print(f"{dtype:>8} {label:>6}: {r['tok_s']:7.1f} tok/s" + (f", acceptance {100 * r['acc']:.1f}%" if label == "draft" else ""))
    same = sum(x == y for x, y in zip(out["draft"]["texts"], out["plain"]["texts"]))
    print(f"{dtype}: speculative decoding {out['draft']['tok_s'] / out['plain']['tok_s']:.2f}x the batch-1 tok/s "
          f"(target >= 1.5x); greedy outputs identical: {same} of {len(prompts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", nargs="+", default=["throughput", "structured", "prefix", "speculative"],
                    choices=["throughput", "structured", "prefix", "speculative"])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 1])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--dtype", default=None, help="server compute dtype (float32 | bfloat16) [default: the server's "
                                                  "auto: bf16 where it decodes a batch faster]")
    ap.add_argument("--threads", type=int, default=None, help="server OMP_NUM_THREADS [default: all cores]")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--target", type=int, nargs=4, default=[12, 768, 200, 8], metavar=("LAYERS", "EMBD", "ITERS", "BATCH"))
    ap.add_argument("--draft", type=int, nargs=4, default=[2, 128, 800, 16], metavar=("LAYERS", "EMBD", "ITERS", "BATCH"))
    ap.add_argument("--speculative-tokens", type=int, default=4)
    ap.add_argument("--spec-dtypes", nargs="+", default=["float32", "bfloat16"],
                    help="the target's dtype, one plain/draft pair each (the draft picks its own)")
    ap.add_argument("--spec-tokens", type=int, default=128, help="greedy tokens per speculative-phase request")
    a = ap.parse_args()
    from gptlab.runtime import describe_cpu

    print(describe_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "bench"
        if set(a.phases) - {"speculative"}:
            make_run(run, a.preset)
        for name in a.phases:
            if name == "speculative":
                speculative(Path(tmp), a)
            else:
                globals()[name](run, a)


if __name__ == "__main__":
    main()
