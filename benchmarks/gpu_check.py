"""GPU validation in one short run (under 8 minutes on one H100): the CUDA tests; bf16 training of a
GPT-3-small-shaped GPT-2 124M (alternating dense / banded layers, 2048 context: FlexAttention for the
banded layers, SDPA for the dense ones, torch.compile) with tokens/s and MFU against the H100's bf16
dense peak (989 TFLOP/s); KV-cache decoding tokens/s of GPT-2 124M at batch 1/8/64; DDP and FSDP2 under
`torchrun --nproc_per_node 1`. Each step runs on its own; a failure is reported and the others go on.

    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --smoke        # the same steps, tiny and on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE = 989e12  # FLOP/s, dense bf16 (H100 SXM datasheet; H200 has the same tensor cores)
WORDS = ("the king queen lord lady sword crown night day love death war peace england france rome york "
         "speak come go stay hear see know think fear hope grace honour blood heart hand eye tongue").split()


def synthetic_corpus(path: Path, n_words: int) -> Path:
    """Deterministic word salad: enough tokens for throughput, no download."""
    rng = random.Random(0)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
             for _ in range(n_words // 10))
    path.write_text("\n".join(lines) + "\n")
    return path


def cuda_tests(a) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_cuda.py")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    return {"ok": p.returncode == 0, "summary": tail, "seconds": round(time.perf_counter() - t, 1)}


def _throughput(run_dir: Path, skip: int) -> tuple[float, float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tok_per_s" in r]
    recs = recs[skip:] or recs  # the first logs include compilation
    return statistics.median(r["tok_per_s"] for r in recs), statistics.median(r["mfu"] for r in recs)


def train(a, data: Path, work: Path) -> dict:
    from gptlab.pretrain import pretrain

    preset, block = ("tiny", 64) if a.smoke else ("gpt3-small", 2048)
    train_cfg = dict(max_iters=a.steps, batch_size=a.batch, block_size=block, dtype="auto", compile=not a.smoke,
                     peak_flops=H100_BF16_DENSE, device=a.device, eval_interval=0, eval_iters=0, log_interval=10,
                     checkpoint_interval=0, warmup_iters=20, warmup_tokens=0, decay_tokens=0, batch_warmup_tokens=0)
    model = {"block_size": block} | ({} if a.smoke else {"vocab_size": 50304})  # padded vocab: nanoGPT's GPU trick
    t = time.perf_counter()
    res = pretrain(str(data), str(work / "train"), preset_name=preset, recipe="gpt3", model_overrides=model,
                   train_layers=(train_cfg,), quiet=False)
    tps, mfu = _throughput(work / "train", skip=3)
    return {"preset": preset, "context": block, "steps": res["step"], "batch": a.batch, "tok_per_s": round(tps),
            "mfu_vs_989_tflops": round(mfu, 4), "final_loss": round(res.get("loss", float("nan")), 4),
            "seconds": round(time.perf_counter() - t, 1)}


def decode(a) -> dict:
    from gptlab.generate import Generator, SamplingParams
    from gptlab.model import GPT, preset
    from gptlab.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size) if a.smoke else preset("gpt2")
    gen = Generator(GPT(cfg).to(a.device), tok, dtype="auto")
    out = {"dtype": str(gen.dtype).removeprefix("torch.")}
    new = 16 if a.smoke else 128
    p = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    prompt = list(range(1000, 1032))
    for b in (1, 8, 64):
        gen.generate([prompt] * b, p)  # warm-up: allocator, kernels
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        gen.generate([prompt] * b, p)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        out[f"batch_{b}_tok_per_s"] = round(b * new / (time.perf_counter() - t), 1)
    return out


def distributed(a, data: Path, work: Path, mode: str) -> dict:
    preset, block = ("tiny", 64) if a.smoke else ("gpt2", 1024)
    out = work / f"torchrun_{mode}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "gptlab",
           "pretrain", "--data", str(data), "--out", str(out), "--preset", preset, "--recipe", "gpt3",
           "--train.distributed", mode, "--train.max_iters", str(a.dist_steps), "--train.batch_size", str(a.batch),
           "--train.block_size", str(block), "--train.device", a.device, "--train.log_interval", "10",
           "--train.eval_interval", "0", "--train.eval_iters", "0", "--train.checkpoint_interval", str(a.dist_steps),
           "--train.warmup_iters", "5", "--train.warmup_tokens", "0", "--train.decay_tokens", "0",
           "--train.batch_warmup_tokens", "0", "--train.peak_flops", str(H100_BF16_DENSE)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    res = {"ok": p.returncode == 0, "seconds": round(time.perf_counter() - t, 1)}
    if p.returncode:
        res["error"] = (p.stderr or p.stdout).strip().splitlines()[-1][-300:]
        return res
    tps, mfu = _throughput(out, skip=1)
    return res | {"tok_per_s": round(tps), "mfu_vs_989_tflops": round(mfu, 4),
                  "checkpoint": (out / "latest.json").is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: check the script itself")
    p.add_argument("--steps", type=int, default=None, help="training steps [default: 200; smoke 6]")
    p.add_argument("--dist-steps", type=int, default=None, help="torchrun steps [default: 40; smoke 4]")
    p.add_argument("--batch", type=int, default=None, help="sequences per step [default: 8; smoke 4]")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip", action="append", default=[], help="tests | train | decode | ddp | fsdp")
    a = p.parse_args()
    a.device = "cpu" if a.smoke else "cuda"
    a.steps = a.steps or (6 if a.smoke else 200)
    a.dist_steps = a.dist_steps or (4 if a.smoke else 40)
    a.batch = a.batch or (4 if a.smoke else 8)
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --smoke to check the script on the CPU")
    from gptlab.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="gptlab-gpucheck-"))
    results: dict = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu (smoke)",
                     "torch": torch.__version__, "cuda": torch.version.cuda}
    t0 = time.perf_counter()
    corpus = synthetic_corpus(work / "corpus.txt", 200_000 if a.smoke else 3_000_000)
    data = work / "data"
    prepare(corpus, data, tokenizer="char" if a.smoke else "gpt2", progress=False)
    steps = [("tests", lambda: cuda_tests(a)), ("train", lambda: train(a, data, work)), ("decode", lambda: decode(a)),
             ("ddp", lambda: distributed(a, data, work, "ddp")), ("fsdp", lambda: distributed(a, data, work, "fsdp"))]
    for name, fn in steps:
        if name in a.skip or (a.smoke and name == "tests"):
            continue
        print(f"--- {name} ---", flush=True)
        try:
            results[name] = fn()
        except Exception as e:  # report and go on: one broken path must not hide the others' figures
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        print(json.dumps({name: results[name]}), flush=True)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    print("\n" + json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
