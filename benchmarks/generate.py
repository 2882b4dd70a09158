"""Decoding speed: gptlab's KV-cache generator vs transformers' `generate`, same weights, same run.

GPT-2 124M config with random weights (created by transformers, imported into gptlab), a 32-token
prompt, greedy decoding that never stops early. Prints tokens/s for transformers fp32 and gptlab fp32 /
bf16 at batch 1 (128 new tokens) and batch 8 (64 new tokens), the ratios, time-to-first-token for a
512-token prompt, and the fraction of the memory-bandwidth ceiling reached at batch 1 (bytes of weights
read per token × tokens/s ÷ the read bandwidth measured here).

    python benchmarks/generate.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gptlab.generate import Generator, SamplingParams
from gptlab.interop.hf import import_hf
from gptlab.run import load_run
from gptlab.runtime import tune_cpu_allocator


def read_bandwidth(gb: float = 1.0) -> float:
    x = torch.ones(int(gb * 2**30 / 4))  # touched pages, not the shared zero page
    x.sum()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    import transformers

    tune_cpu_allocator()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    work = Path(tempfile.mkdtemp(prefix="gptlab-genbench-"))
    hf.save_pretrained(work / "hf")
    import_hf(work / "hf", work / "run", tokenizer="gpt2")
    prompt = list(range(1000, 1032))
    x1 = torch.tensor([prompt])
    results = {}

    def hf_gen(batch: int, new: int):
        with torch.inference_mode():
            hf.generate(x1.repeat(batch, 1), do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    results["transformers fp32, batch 1"] = 128 / timed(lambda: hf_gen(1, 128))
    results["transformers fp32, batch 8"] = 8 * 64 / timed(lambda: hf_gen(8, 64))
    hf = None  # free its weights before gptlab loads the same ones

    for dtype in (torch.float32, torch.bfloat16):
        run = load_run(work / "run")
        gen = Generator(run.model, run.tokenizer, dtype=dtype)
        name = "fp32" if dtype == torch.float32 else "bf16"
        p1 = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
        p8 = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
        results[f"gptlab {name}, batch 1"] = 128 / timed(lambda: gen.generate([prompt], p1))
        results[f"gptlab {name}, batch 8"] = 8 * 64 / timed(lambda: gen.generate([prompt] * 8, p8))
        long = list(range(100, 612))
        ttft = timed(lambda: gen.generate([long], SamplingParams(max_new_tokens=1, temperature=0)), repeats=3)
        results[f"gptlab {name}, time to first token (512-token prompt), ms"] = 1e3 * ttft
        if dtype == torch.float32:
            weight_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters()) - \
                run.model.wpe.weight.numel() * 4  # wte is read once, as the LM head
        else:
            weight_bytes_bf16 = sum(p.numel() * p.element_size() for p in gen.model.parameters()) - \
                gen.model.wpe.weight.numel() * 2
        gen = run = None

    bw = read_bandwidth()
    print(f"GPT-2 124M, random weights, 32-token prompt, greedy, CPU {torch.get_num_threads()} threads; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s")
    for k, v in results.items():
        print(f"  {k:55s} {v:8.1f}" + ("" if "ms" in k else " tok/s"))
    base1, base8 = results["transformers fp32, batch 1"], results["transformers fp32, batch 8"]
    checks = [("fp32 batch 1 vs transformers (target ≥ 1.2×)", results["gptlab fp32, batch 1"] / base1, 1.2),
              ("bf16 batch 1 vs transformers fp32 (target ≥ 2×)", results["gptlab bf16, batch 1"] / base1, 2.0),
              ("fp32 batch 8 vs transformers batch 8 (target ≥ 2×)", results["gptlab fp32, batch 8"] / base8, 2.0),
              ("bf16 batch 8 vs transformers batch 8 (target ≥ 2×)", results["gptlab bf16, batch 8"] / base8, 2.0)]
    for label, ratio, target in checks:
        print(f"  {label:55s} {ratio:8.2f}×  {'MET' if ratio >= target else 'NOT MET'}")
    for name, nbytes in (("fp32", weight_bytes), ("bf16", weight_bytes_bf16)):
        frac = nbytes * results[f"gptlab {name}, batch 1"] / bw
        print(f"  {name} batch 1: {nbytes / 1e6:.0f} MB of weights per token → {100 * frac:.0f}% of the bandwidth ceiling "
              f"({bw / nbytes:.0f} tok/s)")


if __name__ == "__main__":
    main()
