"""Throughput of one full training step (forward, backward, clip, AdamW) of a preset, on random tokens.

Measures the fp32 eager baseline and gptlab's configuration (bf16 autocast, optionally torch.compile) in
the same process, and prints tokens/s, the ratio, and MFU against the bf16 matmul peak measured here.

    python benchmarks/train_step.py --preset gpt2 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gptlab.model import GPT, preset
from gptlab.train.config import TrainConfig
from gptlab.train.metrics import measure_peak_flops
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also measure bf16 + torch.compile")
    a = p.parse_args()
    torch.manual_seed(0)
    model = GPT(preset(a.preset, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = a.batch * a.seq
    flops_tok = model.flops_per_token(a.seq)
    peak = measure_peak_flops(torch.device("cpu"), torch.bfloat16)
    print(f"{a.preset}: {model.num_params() / 1e6:.1f}M params, batch {a.batch} × {a.seq}, {torch.get_num_threads()} threads, "
          f"{flops_tok / 1e6:.0f} MFLOP/token, measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s")
    configs = [("float32", False), ("bfloat16", False)] + ([("bfloat16", True)] if a.compile else [])
    results = {}
    for dtype, comp in configs:
        model.load_state_dict(state)
        times = time_steps(model, dtype, comp, a.batch, a.seq, a.steps, a.warmup)
        med = statistics.median(times)
        results[(dtype, comp)] = tokens / med
        print(f"  {dtype:9s} {'compiled' if comp else 'eager':8s} {med * 1e3:8.0f} ms/step {tokens / med:8.0f} tok/s  "
              f"MFU {100 * flops_tok * tokens / med / peak:5.1f}% (of bf16 peak)")
    base = results[("float32", False)]
    best = max(v for k, v in results.items() if k[0] == "bfloat16")
    print(f"speed-up over fp32 eager in this run: {best / base:.2f}× (target ≥ 3×): {'MET' if best >= 3 * base else 'NOT MET'}")


if __name__ == "__main__":
    main()
