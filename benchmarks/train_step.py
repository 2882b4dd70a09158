"""Throughput of one full training step (forward, backward, clip, AdamW) of a preset, on random tokens.

Measures, in this one invocation (each configuration in a fresh process), the plain PyTorch fp32 eager
baseline and gptlab's configuration (dtype auto — bf16 autocast where this CPU runs bf16 natively and
faster, else fp32 —, fused linear+cross-entropy, the tuned CPU allocator; optionally torch.compile), and
prints tokens/s, the ratio, and MFU against the matmul peak of each row's dtype measured here.

    python benchmarks/train_step.py --preset gpt2 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

from gptlab.model import GPT, preset
from gptlab.train.config import TrainConfig
from gptlab.runtime import describe_cpu, dtype_name, linear_shape, peak_flops, resolve_dtype
from gptlab.train.optim import make_optimizer


def time_steps(model: GPT, dtype: str, compile_: bool, B: int, T: int, steps: int, warmup: int) -> list[float]:
    opt = make_optimizer(model, TrainConfig(), "cpu")
    fwd = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def worker(a) -> None:
    """One configuration in a fresh process, so the plain baseline keeps glibc's default allocator."""
    if a.tune:
        from gptlab.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    torch.manual_seed(0)
    model = GPT(preset(a.preset, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    times = time_steps(model, a.dtype, a.compile, a.batch, a.seq, a.steps, a.warmup)
    print(json.dumps({"ms": 1e3 * statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also measure bf16 + torch.compile")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    with torch.device("meta"):
        model = GPT(preset(a.preset))
    tokens = a.batch * a.seq
    flops_tok = model.flops_per_token(a.seq)
    auto = dtype_name(resolve_dtype("auto", "cpu", linear_shape(model, tokens)))
    peaks = {d: peak_flops("cpu", getattr(torch, d)) for d in {"float32", auto}}
    print(f"{a.preset}: {model.num_params() / 1e6:.1f}M params, batch {a.batch} × {a.seq}, {describe_cpu()}, "
          f"{flops_tok / 1e6:.0f} MFLOP/token, measured matmul peak "
          + ", ".join(f"{d} {v / 1e12:.2f} TFLOP/s" for d, v in sorted(peaks.items())))
    # (label, dtype, gptlab's allocator tuning, compile); the first is the plain PyTorch baseline
    configs = [("fp32 eager, plain PyTorch", "float32", False, False),
               ("fp32 eager, gptlab allocator", "float32", True, False)]
    if auto != "float32":
        configs.append((f"auto={auto} eager, gptlab", auto, True, False))
    if a.compile:
        configs.append((f"auto={auto} compiled, gptlab", auto, True, True))
    results = {}
    for label, dtype, tune, comp in configs:
        cmd = [sys.executable, __file__, "--worker", "--preset", a.preset, "--batch", str(a.batch), "--seq", str(a.seq),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--dtype", dtype] + ["--tune"] * tune + ["--compile"] * comp
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        ms = json.loads(out)["ms"]
        results[label] = tokens / (ms / 1e3)
        print(f"  {label:30s} {ms:8.0f} ms/step {results[label]:8.0f} tok/s  "
              f"MFU {100 * flops_tok * results[label] / peaks[dtype]:5.1f}% (of the {dtype} peak)")
    base = results[configs[0][0]]
    best = max(v for k, v in results.items() if "gptlab" in k)
    print(f"speed-up of gptlab (auto = {auto}) over plain fp32 eager in this run: {best / base:.2f}×"
          + (f" (target ≥ 3× where bf16 is native): {'MET' if best >= 3 * base else 'NOT MET'}" if auto == "bfloat16" else ""))


if __name__ == "__main__":
    main()
