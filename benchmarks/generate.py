"""Decoding speed: gptlab's KV-cache generator vs transformers' `generate`, same weights, same run.

GPT-2 124M config with random weights (created by transformers, imported into gptlab), a 32-token
prompt, greedy decoding that never stops early. Prints tokens/s for transformers fp32 and gptlab with
`--dtype auto` (what every command uses by default), fp32 and, where this CPU has native bf16, bf16, at
batch 1 (128 new tokens) and batch 8 (64 new tokens); time to first token for a 512-token prompt; and at
batch 1 the fraction of the memory-bandwidth ceiling reached (bytes of weights read per token ×
tokens/s ÷ the read bandwidth measured just before and after that very measurement: this machine's
bandwidth drifts).

    python benchmarks/generate.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptlab.generate import Generator, SamplingParams
from gptlab.interop.hf import import_hf
from gptlab.run import load_run
from gptlab.runtime import cpu_bf16_native, describe_cpu, tune_cpu_allocator

_BUF = None


def read_bandwidth(gb: float = 1.0) -> float:
    """Best of 3 reads of a 1 GB buffer (touched pages, not the shared zero page), bytes/s."""
    global _BUF
    if _BUF is None:
        _BUF = torch.ones(int(gb * 2**30 / 4))
        _BUF.sum()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        _BUF.sum()
        best = max(best, _BUF.numel() * 4 / (time.perf_counter() - t))
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
    results, ceilings = {}, {}

    def hf_gen(batch: int, new: int):
        with torch.inference_mode():
            hf.generate(x1.repeat(batch, 1), do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    results["transformers fp32, batch 1"] = 128 / timed(lambda: hf_gen(1, 128))
    results["transformers fp32, batch 8"] = 8 * 64 / timed(lambda: hf_gen(8, 64))
    hf = None  # free its weights before gptlab loads the same ones

    configs = ["auto", "float32"] + (["bfloat16"] if cpu_bf16_native()[0] else [])
    p1 = SamplingParams(max_new_tokens=128, temperature=0, ignore_eos=True)
    p8 = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
    for name in configs:
        run = load_run(work / "run")
        gen = Generator(run.model, run.tokenizer, dtype=name, rows=1)
        label = f"{name} → {str(gen.dtype).removeprefix('torch.')}" if name == "auto" else name
        bw_before = read_bandwidth()
        tps = 128 / timed(lambda: gen.generate([prompt], p1))
        bw = statistics.mean([bw_before, read_bandwidth()])
        results[f"gptlab {label}, batch 1"] = tps
        nbytes = sum(p.numel() * p.element_size() for p in gen.model.parameters()) - \
            gen.model.wpe.weight.numel() * gen.model.wpe.weight.element_size()  # wte is read once, as the LM head
        ceilings[label] = (nbytes, bw, tps)
        gen8 = gen if name != "auto" else Generator(load_run(work / "run").model, run.tokenizer, dtype=name, rows=8)
        label8 = f"{name} → {str(gen8.dtype).removeprefix('torch.')}" if name == "auto" else name
        results[f"gptlab {label8}, batch 8"] = 8 * 64 / timed(lambda: gen8.generate([prompt] * 8, p8))
        long = list(range(100, 612))
        ttft = timed(lambda: gen.generate([long], SamplingParams(max_new_tokens=1, temperature=0)), repeats=3)
        results[f"gptlab {label}, time to first token (512-token prompt), ms"] = 1e3 * ttft
        gen = gen8 = run = None

    print(f"GPT-2 124M, random weights, 32-token prompt, greedy; {describe_cpu()}")
    for k, v in results.items():
        print(f"  {k:60s} {v:8.1f}" + ("" if "ms" in k else " tok/s"))
    base1 = results["transformers fp32, batch 1"]
    auto1 = next(v for k, v in results.items() if k.startswith("gptlab auto") and k.endswith("batch 1"))
    print(f"  {'auto batch 1 vs transformers fp32 (target ≥ 1.2×)':60s} {auto1 / base1:8.2f}×  "
          f"{'MET' if auto1 >= 1.2 * base1 else 'NOT MET'}")
    for label, (nbytes, bw, tps) in ceilings.items():
        frac = nbytes * tps / bw
        target = "  (target ≥ 80%: " + ("MET)" if frac >= 0.8 else "NOT MET)") if label.startswith("auto") else ""
        print(f"  {label} batch 1: {nbytes / 1e6:.0f} MB of weights per token at {bw / 1e9:.1f} GB/s → ceiling "
              f"{bw / nbytes:.0f} tok/s; reached {100 * frac:.0f}%{target}")


if __name__ == "__main__":
    main()
