"""InstructGPT (Ouyang et al., 2022) at laptop scale, on real human preferences: Anthropic's HH-RLHF harmless
comparisons shipped in ../shared/data (offensive by design).

The 1,800 pairs are shuffled once and cut three ways: 300 test pairs (never trained on), half A (the policy's
reward model) and half B (a second reward model, the *judge*, which no policy is trained against). Then, with
the existing stages:

1. `gptlab pretrain` on the dialogues of A and B (both replies), a byte-level BPE trained on them;
2. `gptlab sft` on A's chosen dialogues (InstructGPT step 1: demonstrations);
3. `gptlab reward train` from the SFT model on A's comparisons (step 2), and the judge on B's;
4. `gptlab rlhf`: PPO against the reward model with the SFT model as the frozen KL reference (step 3), then a
   second round whose comparisons are the round-1 policy's own samples ranked by the judge (InstructGPT's
   labellers ranked samples of the current policies);
5. `gptlab ppo` again with PPO-ptx (the pretraining loss mixed in) for the alignment tax.

Measured: pairwise accuracy on the test pairs against the "shorter reply wins" heuristic and TF-IDF; the
judge's reward, the policy's own reward and the KL from SFT at every PPO checkpoint on held-out prompts (the
over-optimisation curve); pretraining perplexity of every model (the alignment tax).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from gptlab.fileio import atomic_write_json, read_json
from gptlab.reproduce.report import Reproduction
from gptlab.reproduce.steps import last_metric, pretrained

PAPER = ("Ouyang et al., Training language models to follow instructions with human feedback, NeurIPS 2022 "
         "(InstructGPT); the over-optimisation curve as in Gao, Schulman & Hilton, Scaling Laws for Reward Model "
         "Overoptimization, 2022; data: Bai et al., 2022 (Anthropic HH-RLHF, harmless)")
SUMMARY = ("HH-harmless comparisons: reward model vs the shorter-reply heuristic, PPO vs SFT by an independent "
           "judge, KL-vs-reward curve, PPO-ptx alignment tax, two rounds (~25 min)")
_PPO = dict(iterations=60, rollout_prompts=16, max_new_tokens=48, minibatch_size=8, ppo_epochs=2, actor_lr=3e-5,
            critic_lr=3e-5, kl_coef=0.02, checkpoint_every=10, keep_last=20, eval_every=0, forward_batch_size=16)
_CPU = dict(layers=4, width=256, heads=4, context=256, bpe=4000, steps=600, batch=16, lr=1e-3, test=300,
            sft_epochs=2.0, rm_epochs=2.0, rm_lr=5e-5, ppo=_PPO, eval_prompts=64, ptx_coef=1.0, rounds=2,
            judge_prompts=64, judge_samples=4)
SCALES = {
    "cpu": _CPU,
    # GPT-2 small's shape and context (the corpus stays these dialogues)
    "gpu": dict(_CPU, layers=12, width=768, heads=12, context=512, bpe=8000, steps=4000, batch=32, lr=6e-4,
                ppo=dict(_PPO, iterations=100, rollout_prompts=64, max_new_tokens=96, minibatch_size=16,
                         actor_lr=1e-5, critic_lr=1e-5), eval_prompts=200, judge_prompts=256),
    # a three-minute end-to-end check of the recipe (its numbers mean nothing)
    "smoke": dict(_CPU, layers=1, width=32, heads=2, context=128, bpe=300, steps=10, batch=4, test=40,
                  sft_epochs=0.1, rm_epochs=0.1, ppo=dict(_PPO, iterations=4, rollout_prompts=4, max_new_tokens=8,
                                                          minibatch_size=4, ppo_epochs=1, checkpoint_every=2),
                  eval_prompts=8, rounds=2, judge_prompts=4, judge_samples=2),
}
HH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "preferences" / "hh_harmless_1800.jsonl"


def _split(out: Path, source: Path, s: dict) -> dict[str, Path]:
    """The pairs, shuffled once (seed 0) and cut into test / A / B, and the files the stages read."""
    from gptlab.align.data import split_hh_dialogue
    from gptlab.errors import GptlabError

    try:
        rows = [json.loads(ln) for ln in source.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{source}: not readable as JSON lines ({e})") from None
    if not rows or not all(isinstance(r, dict) and {"chosen", "rejected"} <= set(r) for r in rows):
        raise GptlabError(f"{source}: expected HH-RLHF rows with 'chosen' and 'rejected' dialogues")
    random.Random(0).shuffle(rows)
    half = (len(rows) - s["test"]) // 2
    parts = {"test": rows[:s["test"]], "rm": rows[s["test"]:s["test"] + half], "judge": rows[s["test"] + half:]}
    files = {}
    for name, part in parts.items():
        files[name] = out / "pairs" / f"{name}.jsonl"
        _write(files[name], part)
    files["corpus"] = _write(out / "pairs" / "pretrain.jsonl",  # every dialogue of A and B, both replies
                             [{"text": r[k]} for r in parts["rm"] + parts["judge"] for k in ("chosen", "rejected")])
    files["sft"] = _write(out / "pairs" / "sft.jsonl", [{"messages": split_hh_dialogue(r["chosen"])} for r in parts["rm"]])
    files["eval_prompts"] = _write(out / "pairs" / "eval_prompts.jsonl", parts["test"][:s["eval_prompts"]])
    return files


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pretrain(out: Path, files: dict, s: dict, quiet: bool) -> tuple[Path, Path]:
    from gptlab.data.prepare import prepare

    data, run = out / "corpus", out / "pretrained"
    if not (data / "meta.json").is_file():
        prepare(files["corpus"], data, tokenizer=f"bpe:{s['bpe']}", val_fraction=0.05, progress=not quiet)
    model = dict(n_layer=s["layers"], n_embd=s["width"], n_head=s["heads"], block_size=s["context"])
    train = dict(max_iters=s["steps"], batch_size=s["batch"], lr=s["lr"], warmup_iters=max(1, s["steps"] // 10),
                 eval_interval=0, checkpoint_interval=max(1, s["steps"] // 2), dtype="auto", log_interval=50)
    pretrained(data, run, "gpt2", "nanogpt", model, train, quiet)
    return data, run


def _stage(run: Path, fn, **kw) -> Path:
    """A stage run, cached: skipped when its folder holds a finished run (final.json)."""
    if not (run / "final.json").is_file():
        fn(run, resume=(run / "latest.json").exists(), **kw)
        atomic_write_json(run / "final.json", {"done": True})
    return run


def _judge_fn(judge_dir: Path):
    """`gptlab rlhf`'s labeller for round 2: the judge ranks the policy's samples by its reward."""
    from gptlab.align.reward import RewardModel

    rm = RewardModel.load(judge_dir)

    def rank(prompt: list[dict], responses: list[str]) -> list[int]:
        scores = rm.score([prompt] * len(responses), responses)
        return sorted(range(len(responses)), key=lambda i: -scores[i])

    return rank


def run(out: Path, scale: str = "cpu", quiet: bool = False, source: Path | None = None) -> Reproduction:
    from gptlab.align.reward import train_reward
    from gptlab.align.rlhf import rlhf
    from gptlab.align.sft import sft
    from gptlab.align.ppo import ppo
    from gptlab.reproduce.instructgpt_eval import baselines, checkpoint_curve, policy_eval, rm_accuracy, tax
    from gptlab.reproduce.instructgpt_report import report
    from gptlab.run import describe_run

    t0, s = time.perf_counter(), SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    files = _split(out, Path(source or HH), s)
    data, pre = _pretrain(out, files, s, quiet)
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    say("SFT on the chosen dialogues of half A")
    sft_dir = _stage(out / "sft", sft, data=str(files["sft"]), init_from=pre, epochs=s["sft_epochs"], quiet=True, skip_empty=True,
                     train=dict(lr=1e-4, batch_size=16, eval_interval=0, checkpoint_interval=0, dtype="auto"))
    rm_train = dict(lr=s["rm_lr"], batch_size=16, eval_interval=0, checkpoint_interval=0, dtype="auto")
    say("reward models: the policy's on half A, the judge on half B")
    judge = _stage(out / "judge", train_reward, data=str(files["judge"]), init_from=sft_dir, epochs=s["rm_epochs"],
                   heldout_fraction=0.05, train=rm_train, quiet=True)
    say("rlhf: reward model + PPO, two rounds")
    summary = rlhf(out / "rlhf", sft_from=sft_dir, preferences=str(files["rm"]), prompts=str(files["rm"]),
                   rounds=s["rounds"], judge=_judge_fn(judge), quiet=True,
                   reward=dict(epochs=s["rm_epochs"], heldout_fraction=0.05, train=rm_train,
                               judge_prompts=s["judge_prompts"], judge_samples=s["judge_samples"]),
                   ppo=dict(s["ppo"], eval_prompts=str(files["eval_prompts"])))
    rm1, ppo1 = out / "rlhf" / "round_1" / "reward", out / "rlhf" / "round_1" / "ppo"
    say("PPO-ptx: the same PPO with the pretraining loss mixed in")
    ptx = _stage(out / "ppo_ptx", ppo, prompts=str(files["rm"]), actor_from=sft_dir, reward_from=rm1, quiet=True,
                 config=dict(s["ppo"], eval_prompts=str(files["eval_prompts"]), ptx_coef=s["ptx_coef"], ptx_data=str(data)))
    say("measuring")
    prompts = files["eval_prompts"]
    measured = {
        "scale": scale, "pairs": {k: sum(1 for _ in files[k].open()) for k in ("test", "rm", "judge")},
        "pretrain_val_loss": last_metric(pre, "val_loss"), "corpus_tokens": read_json(data / "meta.json", "meta")["train"]["tokens"],
        "params": describe_run(pre)["parameters"],
        "accuracy": {"reward model (A)": rm_accuracy(rm1, files["test"]), "judge (B)": rm_accuracy(judge, files["test"]),
                     "round-2 reward model": rm_accuracy(out / "rlhf" / "round_2" / "reward", files["test"])
                     if s["rounds"] > 1 else None, **baselines(files["rm"], files["test"])},
        "policies": {name: policy_eval(out, name, d, sft_dir, rm1, judge, prompts, s) for name, d in
                     (("pretrained", pre), ("SFT", sft_dir), ("PPO", ppo1), ("PPO-ptx", ptx),
                      *((("PPO round 2", out / "rlhf" / f"round_{s['rounds']}" / "ppo"),) if s["rounds"] > 1 else ()))},
        "curve": checkpoint_curve(out, ppo1, sft_dir, rm1, judge, prompts, s),
        "tax": tax(out, data, {"pretrained": pre, "SFT": sft_dir, "PPO": ppo1, "PPO-ptx": ptx}),
        "rounds": summary["rounds"],
    }
    return report(out, s, measured, PAPER, time.perf_counter() - t0)
