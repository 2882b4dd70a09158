"""Full fine-tuning vs LoRA vs QLoRA, each figure measured in this run on this machine:

- cost: trained parameters, peak memory (the process's peak resident set during training, as the engine
  logs it: `peak_mem_mb`) and time per optimizer step of `gptlab sft` and `gptlab ppo` on the `gpt2` (124M)
  config, random init (cost does not depend on the weights' values). Each mode runs in a fresh process, so
  each peak is its own. SFT: 256-token packed windows × 4, on tiny-shakespeare line pairs. PPO: a
  programmatic reward, 8 rollouts × 32 new tokens a round, minibatch 4; full PPO holds a frozen reference
  copy, LoRA's reference is the actor with its adapters off.
- xl: PPO of the `gpt2-xl` (1.5B) config with QLoRA int4, the same rounds: does it fit this machine, and
  at what peak memory and time per round (full PPO's weights, gradients and Adam moments alone are estimated,
  not run: they exceed the machine's memory).
- quality: the pipeline's SFT task (runs/pipeline: `make demo` first), its settings (1 epoch, batch 16),
  full (its lr 3e-4) vs LoRA and QLoRA int4 (rank 16, α 32, lr 2e-3): validation loss on assistant tokens.

    python benchmarks/lora.py [--phases cost quality xl] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODES = {"full": {}, "lora": {"r": 16, "alpha": 32}, "qlora-int8": {"r": 16, "alpha": 32, "quantize": "int8"},
         "qlora-int4": {"r": 16, "alpha": 32, "quantize": "int4"}}


def make_base(d: Path, name: str = "gpt2") -> tuple[Path, int]:
    import torch

    from gptlab.chat.template import ensure_chat_tokens
    from gptlab.model import GPT, preset
    from gptlab.run import write_run_config
    from gptlab.run.format import MODEL_FILE, save_model
    from gptlab.tokenizer import gpt2_tokenizer

    tok = ensure_chat_tokens(gpt2_tokenizer())  # the chat tokens already in: every mode trains the same tensors
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size))
    write_run_config(d, model.cfg, tok, stage="sft")
    save_model(model, d / MODEL_FILE)
    return d, model.num_params()


def sft_rows(path: Path, n: int = 400) -> Path:
    lines = [x for x in SHAKESPEARE.read_text().splitlines() if x.strip()] if SHAKESPEARE.is_file() else \
        [f"line {i} of a play, spoken by someone" for i in range(2 * n)]
    rows = [{"prompt": lines[i], "response": lines[i + 1]} for i in range(0, 2 * n, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_a(prompts, responses):  # ppo's programmatic reward: the share of the letter a
    return [r.count("a") / max(1, len(r)) for r in responses]


def child(stage: str, mode: str, base: Path, work: Path, steps: int) -> dict:
    """One stage in one mode, in this (fresh) process -> its figures."""
    from gptlab.train.metrics import read_metrics

    out = work / f"{stage}-{mode}"
    lora = MODES[mode]
    t0 = time.perf_counter()
    if stage == "sft":
        from gptlab.align.sft import sft

        sft(out, sft_rows(work / "sft.jsonl"), init_from=base, pack=True, quiet=True, lora=lora,
            train=dict(max_iters=steps, batch_size=4, block_size=256, lr=1e-4, eval_interval=0, log_interval=1,
                       checkpoint_interval=0, dtype="auto"))
    else:
        from gptlab.align.ppo import ppo

        prompts = [f"Tell me about {w}." for w in "apples bananas cats dogs eggs figs grapes hats".split()] * 2
        ppo(out, prompts, actor_from=base, reward_fn=f"{Path(__file__).stem}:reward_a", quiet=True, lora=lora,
            config=dict(iterations=steps // 2, rollout_prompts=8, max_new_tokens=32, minibatch_size=4, ppo_epochs=1,
                        eval_prompts=0, checkpoint_every=100, dtype="auto", frozen_dtype="auto"))
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r and "tok_per_s" in r]
    times = [r["batch_tokens"] / r["tok_per_s"] for r in recs]  # log_interval 1: one step each
    if stage == "sft":  # the median step after the first (it warms up)
        step_s = sorted(times[1:])[len(times[1:]) // 2]
    else:  # a PPO round: its rollout (made in the round's first step) and its 2 steps; the first round warms up
        step_s = sum(times[2:]) / (len(times) // 2 - 1)
    cfg = json.loads((out / "config.json").read_text())
    return {"stage": stage, "mode": mode, "step_s": step_s, "peak_mem_mb": recs[-1]["peak_mem_mb"],
            "trainable": _trainable(out), "wall_s": wall, "dtype": cfg.get("train", cfg.get("ppo", {})).get("dtype")}


def _trainable(out: Path) -> int:
    """Trained parameters: the Adam first moments in the last checkpoint, counted."""
    from gptlab.run.format import read_safetensors

    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    return sum(v.numel() for k, v in read_safetensors(ckpt / "optimizer.safetensors").items() if k.endswith("|exp_avg"))


def run_child(stage: str, mode: str, base: Path, work: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks'}:{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, __file__, "--child", stage, mode, str(base), str(work), str(steps)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{stage} {mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def xl(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        base, n = make_base(work / "base", "gpt2-xl")
        print(f"gpt2-xl config, random init: {n / 1e9:.2f}B parameters (made and saved in {time.perf_counter() - t0:.0f} s)")
        # full PPO, fp32 actor + critic: weights, gradients, Adam's two moments (16 bytes a parameter each), plus
        # a bf16 frozen reference (2 bytes); activations and the interpreter come on top
        print(f"full PPO would hold ≈ {(2 * n * 16 + 2 * n) / 2**30:.0f} GiB before activations (estimate; not run)")
        x = run_child("ppo", "qlora-int4", base, work, steps)
        print(f"ppo qlora-int4: trained {x['trainable']:,} · peak {x['peak_mem_mb']:,.0f} MiB · round {x['step_s']:.1f} s "
              f"· {x['wall_s']:.0f} s in all ({steps // 2} rounds)")


def cost(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, _ = make_base(work / "base")
        rss0 = subprocess.run([sys.executable, "-c", "import resource, torch, gptlab.align.sft; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, check=True).stdout.strip()
        print(f"gpt2 (124M) config, random init; python + torch + gptlab alone: {float(rss0):.0f} MiB resident")
        rows = []
        for stage in ("sft", "ppo"):
            for mode in MODES:
                rows.append(run_child(stage, mode, base, work, steps))
                x = rows[-1]
                unit = "step" if stage == "sft" else "round"
                print(f"{stage:4s} {mode:11s} trained {x['trainable']:>11,}  peak {x['peak_mem_mb']:7,.0f} MiB  "
                      f"{unit} {x['step_s']:6.2f} s  ({x['dtype']})", flush=True)
        for stage in ("sft", "ppo"):
            full = next(x for x in rows if x["stage"] == stage and x["mode"] == "full")
            for x in rows:
                if x["stage"] == stage and x["mode"] != "full":
                    print(f"{stage} {x['mode']}: {x['trainable'] / full['trainable']:.2%} of the trained parameters, "
                          f"peak memory {x['peak_mem_mb'] / full['peak_mem_mb']:.2f}x, {'step' if stage == 'sft' else 'round'} time "
                          f"{x['step_s'] / full['step_s']:.2f}x of full fine-tuning")


def quality() -> None:
    from gptlab.align.sft import sft

    pipe = ROOT / "runs" / "pipeline"
    if not (pipe / "pretrain" / "model.safetensors").is_file():
        sys.exit("quality: run `make demo` first (it writes runs/pipeline)")
    data = json.loads((pipe / "sft" / "config.json").read_text())["sft"]["data"]
    train = dict(batch_size=16, dtype="auto", eval_interval=0, log_interval=10, checkpoint_interval=0)
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for mode, lr in (("full", 3e-4), ("lora", 2e-3), ("qlora-int4", 2e-3)):
            t0 = time.perf_counter()
            r = sft(Path(tmp) / mode, data, init_from=pipe / "pretrain", epochs=1, quiet=True, lora=MODES[mode],
                    train={**train, "lr": lr})
            res[mode] = r["val_loss"]
            print(f"pipeline SFT, {mode:10s} lr {lr:g}: val loss {r['val_loss']:.4f} on assistant tokens "
                  f"({r['step']} steps, {time.perf_counter() - t0:.0f} s)", flush=True)
        for mode in ("lora", "qlora-int4"):
            print(f"quality cost of {mode}: val loss {res[mode] - res['full']:+.4f} vs full fine-tuning")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        stage, mode, base, work, steps = sys.argv[2:7]
        print(json.dumps(child(stage, mode, Path(base), Path(work), int(steps))))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--phases", nargs="+", default=["cost", "quality"], choices=["cost", "quality", "xl"])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per cost run (PPO: steps / 2 rounds)")
    a = p.parse_args()
    from gptlab.runtime import describe_cpu

    print(f"machine: {describe_cpu()}")
    if "cost" in a.phases:
        cost(a.steps)
    if "quality" in a.phases:
        quality()
    if "xl" in a.phases:
        xl(4)


if __name__ == "__main__":
    main()
