"""GPT-1's ablation at CPU scale: does generative pretraining help discriminative fine-tuning, and does the
auxiliary LM objective (λ = 0.5) help? Plus zero- and 8-shot prompting of the pretrained model.

1. Pretrain a small GPT (4 layers × 256, context 256) on Shakespeare's complete works (BPE, 4,000 merges).
2. Fine-tune on a few thousand SST-2 sentences (../shared/data/sst2/train.tsv, seeded split) three ways:
   pretrained + λ 0.5, pretrained + λ 0, random init + λ 0.5 (same architecture, tokenizer and recipe).
3. Accuracy of each on the same held-out sentences; zero-shot and 8-shot prompt accuracy of the
   pretrained model on them ("Sentence: … Sentiment: negative/positive", demonstrations from the
   fine-tuning split).

    python benchmarks/gpt1_ablation.py                       # ~15-20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def gptlab(*args: str) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gptlab", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"gptlab {args[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def last_metric(run: Path, key: str) -> float:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r[key] for r in recs if key in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning lr for every arm (GPT-1: 6.25e-5 at 117M)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    a = p.parse_args()
    if not SST2.is_file():
        sys.exit(f"missing {SST2} (../shared/data/sst2/train.tsv beside the repo)")
    work = Path(a.work or tempfile.mkdtemp(prefix="gptlab-ablation-"))
    work.mkdir(parents=True, exist_ok=True)

    lines = SST2.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    train, test = rows[: a.train_size], rows[a.train_size: a.train_size + a.test_size]
    (work / "train.tsv").write_text("\n".join([header, *train]) + "\n", encoding="utf-8")
    (work / "test.tsv").write_text("\n".join([header, *test]) + "\n", encoding="utf-8")
    majority = max(sum(r.split("\t")[0] == c for r in test) for c in ("0", "1")) / len(test)

    times = {}
    data, pre = work / "shk", work / "pretrained"
    if not (data / "meta.json").exists():
        times["prepare"] = gptlab("prepare", "shakespeare", "--out", str(data), "--tokenizer", "bpe:4000")
    if not (pre / "latest.json").exists():
        times["pretrain"] = gptlab(
            "pretrain", "--data", str(data), "--out", str(pre), "--preset", "small-6x384", "--recipe", "nanogpt",
            "--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "256", "--model.block_size", "256",
            "--model.embd_pdrop", "0.1", "--model.attn_pdrop", "0.1", "--model.resid_pdrop", "0.1",
            "--train.block_size", "256", "--train.batch_size", "8", "--train.max_iters", str(a.pretrain_steps),
            "--train.eval_interval", "0", "--train.checkpoint_interval", "0", "--train.log_interval", "50")

    arms = {"pretrained, λ 0.5": ["--from", str(pre), "--lm-coef", "0.5"],
            "pretrained, λ 0 (no auxiliary LM)": ["--from", str(pre), "--lm-coef", "0"],
            "random init, λ 0.5 (no pretraining)": ["--from", str(pre), "--init", "random", "--lm-coef", "0.5"]}
    acc = {}
    for i, (name, args) in enumerate(arms.items()):
        out = work / f"ft{i}"
        if not (out / "latest.json").exists():
            times[name] = gptlab("finetune", *args, "--data", str(work / "train.tsv"), "--dev", str(work / "test.tsv"),
                                 "--out", str(out), "--epochs", str(a.epochs), "--train.lr", str(a.lr),
                                 "--train.dtype", "float32", "--train.eval_interval", "0")
        acc[name] = last_metric(out, "val_acc")

    task = work / "sst2_prompt.yaml"
    task.write_text(json.dumps({
        "name": "sst2-prompt", "type": "multiple_choice",
        "description": "Classify the sentiment of each sentence as positive or negative.\n\n",
        "template": "Sentence: {sentence}\nSentiment:", "choices": ["negative", "positive"],
        "target": "{label}", "target_kind": "index", "metrics": ["acc", "acc_norm"],
        "data": {"test": str(work / "test.tsv"), "train": str(work / "train.tsv")}}))
    shots = {}
    for k in (0, 8):
        res = work / f"fewshot{k}.json"
        times[f"{k}-shot eval"] = gptlab("evaluate", str(pre), "--task", str(task), "--shots", str(k), "--seed", "0",
                                         "--json", str(res), "--no-progress")
        shots[k] = json.loads(res.read_text())

    print(f"\nGPT-1 ablation on CPU: SST-2, {a.train_size} fine-tuning sentences, {a.test_size} held-out "
          f"(majority class {100 * majority:.1f}%); model 4 × 256, context 256, Shakespeare BPE 4,000 merges, "
          f"{a.pretrain_steps} pretraining steps; fine-tuning lr {a.lr:g}, {a.epochs:g} epochs, batch 32")
    print(f"{'setting':42s} {'held-out accuracy':>18s}")
    for name, v in acc.items():
        print(f"{name:42s} {100 * v:17.1f}%")
    for k, r in shots.items():
        m = _find_metric(r, "acc")
        print(f"{f'pretrained, {k}-shot prompt (no fine-tuning)':42s} {100 * m:17.1f}%")
    print("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"work dir: {work}")


def _find_metric(obj, key: str) -> float:
    """First numeric `key` in the evaluate JSON, wherever the report nests it."""
    if isinstance(obj, dict):
        if isinstance(obj.get(key), (int, float)):
            return float(obj[key])
        for v in obj.values():
            try:
                return _find_metric(v, key)
            except KeyError:
                continue
    if isinstance(obj, list):
        for v in obj:
            try:
                return _find_metric(v, key)
            except KeyError:
                continue
    raise KeyError(key)


if __name__ == "__main__":
    main()
