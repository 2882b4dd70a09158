"""The classic CPU recipe: character-level tiny-shakespeare, 4 layers × 4 heads × 128, block 64, batch 12,
2000 iterations, lr 1e-3 cosine to 1e-4 with 100 warmup steps, no dropout, AdamW β2 0.99.

Runs `gptlab pretrain` with the chosen --dtype/--compile (default: dtype auto, what every command uses),
then (unless --no-baseline) the same recipe in fp32 eager as the baseline, in this one invocation, and
prints both wall times, the ratio and the final val loss on the whole val split (the last 10% of
characters).

    python benchmarks/train_shakespeare_char.py                 # auto vs fp32 eager
    python benchmarks/train_shakespeare_char.py --dtype float32 --compile false --no-baseline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
RECIPE = ["--preset", "small-4x128", "--recipe", "nanogpt", "--model.block_size", "64", "--train.block_size", "64",
          "--train.batch_size", "12", "--train.max_iters", "2000", "--train.lr", "1e-3", "--train.min_lr_ratio", "0.1",
          "--train.warmup_iters", "100", "--train.beta2", "0.99", "--train.eval_interval", "250",
          "--train.eval_iters", "20", "--train.log_interval", "50", "--train.checkpoint_interval", "0"]


def run(data: Path, out: Path, dtype: str, compile_: str, iters: int) -> dict:
    cmd = [sys.executable, "-m", "gptlab", "pretrain", "--data", str(data), "--out", str(out), *RECIPE,
           "--train.dtype", dtype, "--train.compile", compile_, "--train.max_iters", str(iters)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"run failed ({dtype}, compile {compile_}):\n{proc.stderr[-2000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r][-1]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    chosen = next((ln.split("→ ")[1].split(" ")[0] for ln in proc.stderr.splitlines() if ln.startswith("dtype auto")), dtype)
    return {"dtype": dtype if dtype != "auto" else f"auto={chosen}", "compile": compile_, "wall_s": wall, "val_loss": val, "tok_per_s": sorted(tps)[len(tps) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--compile", default="false", choices=["true", "false"])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--no-baseline", action="store_true", help="skip the fp32 eager baseline run")
    p.add_argument("--input", default=str(SHARED), help="tinyshakespeare.txt")
    a = p.parse_args()
    if not Path(a.input).is_file():
        sys.exit(f"missing {a.input} (../shared/data/tinyshakespeare.txt beside the repo)")
    work = Path(tempfile.mkdtemp(prefix="gptlab-bench-"))
    data = work / "data"
    # one document → the split is the last 10% of the character stream, as nanoGPT's prepare.py does
    subprocess.run([sys.executable, "-m", "gptlab", "prepare", a.input, "--out", str(data), "--tokenizer", "char",
                    "--val-fraction", "0.1"], check=True, capture_output=True)
    results = [run(data, work / "fast", a.dtype, a.compile, a.iters)]
    if not a.no_baseline:
        results.append(run(data, work / "baseline", "float32", "false", a.iters))
    from gptlab.runtime import describe_cpu

    print(f"\ntiny-shakespeare char, {a.iters} iterations; {describe_cpu()} (wall time includes start-up and evals)")
    print(f"{'config':28s} {'wall s':>8s} {'tok/s':>9s} {'val loss':>9s}")
    for r in results:
        print(f"{r['dtype'] + ', compile ' + r['compile']:28s} {r['wall_s']:8.1f} {r['tok_per_s']:9,.0f} {r['val_loss']:9.4f}")
    if len(results) == 2:
        ratio = results[0]["wall_s"] / results[1]["wall_s"]
        ok = ratio <= 0.5 and results[0]["val_loss"] <= 1.88
        print(f"wall-time ratio {ratio:.2f} of the fp32 eager baseline (target ≤ 0.50 with val loss ≤ 1.88): "
              f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
