"""The InstructGPT pipeline end to end on CPU, on the shared data:

  pretrain a small GPT (byte-level BPE trained on tinyshakespeare + the instruction/preference texts; cached
  under runs/bench-instruct/pretrain and reused when present)
  -> SFT on the shared instructions (175 English seed tasks + the 2,000 Chinese Alpaca examples, packed)
  -> reward model on a split of hh_harmless_1800 (held-out pairwise accuracy vs chance and a length heuristic)
  -> PPO against that reward model (reward and KL before/after, samples before/after)
  -> DPO on the same training pairs (held-out implicit-reward accuracy and margin; RM-scored samples vs SFT).

Baselines in-run: SFT val loss vs the pretrained model's (same tokens), RM accuracy vs 0.5 and vs "prefer the
shorter response", PPO/DPO reward vs the SFT policy's. Budget: ≤ 30 minutes on 2 CPU cores all in.

    OMP_NUM_THREADS=2 flock /tmp/gptlab-heavy.lock .venv/bin/python benchmarks/instruct_pipeline.py [--fresh]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptlab.align.data import load_preferences, load_sft_examples  # noqa: E402
from gptlab.align.dpo import dpo  # noqa: E402
from gptlab.align.ppo import ppo  # noqa: E402
from gptlab.align.reward import RewardModel, train_reward  # noqa: E402
from gptlab.align.sft import sft  # noqa: E402
from gptlab.stage import split_heldout  # noqa: E402
from gptlab.chat.template import CHAT_TOKENS, render_ids  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SEEDS, ALPACA_ZH = DATA / "instructions" / "seed_tasks.jsonl", DATA / "instructions" / "alpaca_zh_2k.json"
HH = DATA / "preferences" / "hh_harmless_1800.jsonl"
OUT = ROOT / "runs" / "bench-instruct"
SEED = 1337
MERGES, LIMIT = 3000, {}  # BPE merges; train overrides (--smoke)
HELDOUT = 0.1  # of the HH prompts: RM accuracy, DPO accuracy and the sample prompts come from this split


def _hh_text(msgs: list[dict], tail: str | None = None) -> str:
    turns = [f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs]
    if tail is not None:
        turns.append(f"Assistant: {tail}")
    return "\n\n".join(turns)


def pretrain_run(minutes: float) -> Path:
    """A small GPT pretrained on shakespeare + the alignment texts (training split only), cached."""
    from gptlab.data.prepare import prepare
    from gptlab.train.metrics import read_metrics
    from gptlab.tokenizer import build_tokenizer
    from gptlab.pretrain import pretrain

    run = OUT / "pretrain"
    if (run / "model.safetensors").is_file() and (OUT / "throughput.json").is_file():
        tps = json.loads((OUT / "throughput.json").read_text())["tok_per_s"]
        print(f"[pretrain] reusing cached {run} (measured {tps:,.0f} train tok/s when it was made)")
        return run, tps
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    prefs = load_preferences(HH, quiet=True)
    train_idx, _ = split_heldout(len(prefs), HELDOUT, SEED)  # the RM/DPO held-out dialogues stay unseen
    shakes = (DATA / "tinyshakespeare.txt").read_text().split("\n\n")
    docs = ["\n\n".join(shakes[i:i + 40]) for i in range(0, len(shakes), 40)]
    docs += [_hh_text(prefs[i].prompt, r) for i in train_idx for r in prefs[i].responses]
    docs += [_hh_text(c[:-1], c[-1]["content"]) for c in load_sft_examples(SEEDS)]
    docs += [_hh_text(c[:-1], c[-1]["content"]) for c in load_sft_examples(ALPACA_ZH, skip_empty=True)]
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    tok = build_tokenizer(f"bpe:{MERGES}", docs, progress=False)
    tok_file = OUT / "tokenizer.gptlab.json"
    tok.save(tok_file)
    t_tok = time.perf_counter() - t0
    prepare(corpus, OUT / "data", tokenizer=str(tok_file), val_fraction=0.05, seed=SEED, num_workers=2, progress=False)
    # measure the step time for a few steps, then size the run to the budget
    steps = 10 if LIMIT else 40
    probe = OUT / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    model_over = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    base = dict(batch_size=16, lr=1e-3, warmup_iters=50, eval_iters=5, log_interval=50, checkpoint_interval=100000,
                dtype="bfloat16", peak_flops=1e12)
    pretrain(str(OUT / "data"), str(probe), preset_name="small-4x128", recipe="nanogpt", model_overrides=model_over,
             train_layers=({**base, "max_iters": steps, "eval_interval": 0, "eval_iters": 0},), quiet=True)
    tps = [r["tok_per_s"] for r in read_metrics(probe / "metrics.jsonl") if "tok_per_s" in r][-1]
    per_step = base["batch_size"] * model_over["block_size"] / tps
    shutil.rmtree(probe, ignore_errors=True)
    budget = minutes * 60 - (time.perf_counter() - t0)
    iters = max(30, int(budget / per_step * 0.9))
    print(f"[pretrain] tokenizer {tok.vocab_size} ids in {t_tok:.0f}s · {tps:,.0f} tok/s ({per_step:.2f}s/step) · "
          f"{iters} steps")
    pretrain(str(OUT / "data"), str(run), preset_name="small-4x128", recipe="nanogpt", model_overrides=model_over,
             train_layers=({**base, "max_iters": iters, "eval_interval": iters // 2},), quiet=True)
    res = read_metrics(run / "metrics.jsonl")
    tps = sorted(r["tok_per_s"] for r in res if "tok_per_s" in r)[len([r for r in res if "tok_per_s" in r]) // 2]
    (OUT / "throughput.json").write_text(json.dumps({"tok_per_s": tps}))
    print(f"[pretrain] done in {time.perf_counter() - t0:.0f}s · median {tps:,.0f} tok/s")
    return run, tps


def epochs_for(seconds: float, tok_s: float, tokens_per_epoch: int, cap: float) -> float:
    """Epochs that fit a time budget at the measured training throughput (at most `cap`)."""
    return float(min(cap, max(0.05, seconds * tok_s / max(tokens_per_epoch, 1))))


def generate(run_dir: Path, prompts: list[list[dict]], max_new: int = 48) -> list[str]:
    from gptlab.generate import Generator, SamplingParams
    from gptlab.run import load_run

    run = load_run(run_dir)
    tok = run.tokenizer
    stop = tuple(tok.special_tokens[t] for t in CHAT_TOKENS)
    ids = [render_ids(tok, p)[0][-(run.model.cfg.block_size - max_new):] for p in prompts]
    params = SamplingParams(max_new_tokens=max_new, temperature=0.7, seed=0, stop_token_ids=stop)
    return [c.text.strip() for c in Generator(run.model, tok).generate(ids, params)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true", help="retrain everything, the cached pretrained model included")
    ap.add_argument("--pretrain-minutes", type=float, default=5.0, help="tokenizer + data + pretraining")
    ap.add_argument("--ppo-iterations", type=int, default=0, help="0 = as many as fit --ppo-minutes (4..30)")
    for stage, m in (("sft", 3.0), ("rm", 2.5), ("ppo", 4.5), ("dpo", 2.5)):  # training time of each stage
        ap.add_argument(f"--{stage}-minutes", type=float, default=m)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything into runs/bench-instruct-smoke")
    a = ap.parse_args()
    global OUT, MERGES, LIMIT
    if a.smoke:
        OUT, MERGES, LIMIT = OUT.with_name("bench-instruct-smoke"), 200, {"max_iters": 3}
        a.pretrain_minutes, a.ppo_iterations = 0.3, 1
    torch.manual_seed(SEED)
    if a.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    t_all = time.perf_counter()
    times, fig = {}, {}
    t = time.perf_counter()
    pre, tps = pretrain_run(a.pretrain_minutes)
    from gptlab.run import load_run

    tok = load_run(pre).tokenizer
    times["pretrain"] = time.perf_counter() - t
    for d in ("sft-base", "sft", "rm", "ppo", "dpo"):
        shutil.rmtree(OUT / d, ignore_errors=True)

    # --- 1. SFT on the shared instructions ------------------------------------------------------
    t = time.perf_counter()
    sft_data = [{"messages": c} for c in load_sft_examples(SEEDS) + load_sft_examples(ALPACA_ZH, skip_empty=True)]
    sft_train = dict(batch_size=16, lr=5e-4, eval_interval=0, eval_iters=10, log_interval=20, peak_flops=1e12)
    base = sft(OUT / "sft-base", sft_data, init_from=pre, pack=True, train={**sft_train, "max_iters": 0}, quiet=True)
    n_tok = sum(len(tok.encode(m["content"])) + 3 for r in sft_data for m in r["messages"])
    ep = epochs_for(a.sft_minutes * 60, tps, n_tok, 2.0)
    res = sft(OUT / "sft", sft_data, init_from=pre, pack=True, epochs=ep, train={**sft_train, **LIMIT}, quiet=True)
    fig["sft_val_loss_before"], fig["sft_val_loss"] = base["val_loss"], res["val_loss"]
    fig["sft_truncated"] = res["n_truncated"]
    times["sft"] = time.perf_counter() - t
    print(f"[sft] {res['n_train']} train / {res['n_val']} val conversations · val loss on assistant tokens "
          f"{base['val_loss']:.3f} -> {res['val_loss']:.3f} · {res['step']} steps · {times['sft']:.0f}s")

    # --- 2. reward model on HH harmless -----------------------------------------------------------
    t = time.perf_counter()
    prefs = load_preferences(HH, quiet=True)
    train_idx, held_idx = split_heldout(len(prefs), HELDOUT, SEED)
    hh_tokens = sum(2 * (sum(len(tok.encode(m["content"])) + 3 for m in prefs[i].prompt) + 2)
                    + sum(len(tok.encode(r)) for r in prefs[i].responses) for i in train_idx)
    hh_tokens = min(hh_tokens, 256 * 2 * len(train_idx))  # sequences are cut to the context
    ep = epochs_for(a.rm_minutes * 60, tps, hh_tokens, 1.0)
    rm_res = train_reward(OUT / "rm", HH, init_from=OUT / "sft", epochs=ep, heldout_fraction=HELDOUT,
                          train=dict(batch_size=8, lr=1e-4, eval_interval=50, eval_iters=4, log_interval=20,
                                     peak_flops=1e12, **LIMIT), quiet=True)
    held = [prefs[i] for i in held_idx]
    shorter = sum((len(p.responses[0]) < len(p.responses[1])) + 0.5 * (len(p.responses[0]) == len(p.responses[1]))
                  for p in held) / len(held)
    fig.update(rm_heldout_accuracy=rm_res["heldout_accuracy"], rm_train_accuracy=rm_res["train_accuracy"],
               rm_shorter_baseline=shorter, rm_offset=rm_res["offset"])
    times["reward"] = time.perf_counter() - t
    print(f"[rm] {ep:.2f} epochs · held-out pairwise accuracy {rm_res['heldout_accuracy']:.3f} (chance 0.5, "
          f"'shorter wins' {shorter:.3f}) · train {rm_res['train_accuracy']:.3f} · {len(held)} held-out pairs · {times['reward']:.0f}s")

    # --- 3. PPO against the reward model ----------------------------------------------------------
    t = time.perf_counter()
    # one iteration ≈ 16 × ~200 tokens through ~16 forward-equivalents (sampling, 4 scorers, 2 epochs of
    # actor + critic fwd/bwd) ≈ 17k pretraining-token equivalents, plus the token-by-token sampling
    iters = a.ppo_iterations or int(min(30, max(4, a.ppo_minutes * 60 * tps / 17000)))
    ppo_prompts = [{"messages": prefs[i].prompt} for i in train_idx]
    ppo_res = ppo(OUT / "ppo", ppo_prompts, actor_from=OUT / "sft", reward_from=OUT / "rm",
                  config=dict(iterations=iters, rollout_prompts=16, samples_per_prompt=1, ppo_epochs=2,
                              minibatch_size=8, max_new_tokens=128, kl_coef=0.05, actor_lr=2e-5, critic_lr=5e-5,
                              eval_prompts=16, checkpoint_every=10),
                  quiet=True)
    fig.update(ppo_reward_before=ppo_res["reward_before"], ppo_reward_after=ppo_res["reward_after"],
               ppo_kl_after=ppo_res["kl_after"])
    print(f"[ppo] held-out reward {ppo_res['reward_before']:+.3f} -> {ppo_res['reward_after']:+.3f} · KL "
          f"{ppo_res['kl_after']:.4f} nats · {ppo_res.get('step')} steps")
    for tag in ("before", "after"):
        for s in (ppo_res.get(f"samples_{tag}") or [])[:2]:
            s = s if isinstance(s, dict) else {"response": str(s)}
            print(f"  [{tag}] reward {s.get('reward', float('nan')):+.3f} · {s.get('response', '')[:160]!r}")
    times["ppo"] = time.perf_counter() - t

    # --- 4. DPO on the same pairs -------------------------------------------------------------------
    t = time.perf_counter()
    ep = epochs_for(a.dpo_minutes * 60, tps, hh_tokens, 1.0)
    dpo_res = dpo(OUT / "dpo", HH, init_from=OUT / "sft", beta=0.1, epochs=ep, heldout_fraction=HELDOUT,
                  train=dict(batch_size=8, lr=5e-5, eval_interval=100, eval_iters=4, log_interval=20, peak_flops=1e12,
                             **LIMIT), quiet=True)
    fig.update(dpo_heldout_reward_accuracy=dpo_res["heldout_reward_accuracy"], dpo_heldout_margin=dpo_res["heldout_margin"])
    times["dpo"] = time.perf_counter() - t
    print(f"[dpo] {ep:.2f} epochs · held-out implicit-reward accuracy {dpo_res['heldout_reward_accuracy']:.3f} · margin "
          f"{dpo_res['heldout_margin']:+.4f} · {dpo_res['step']} steps · {times['dpo']:.0f}s")

    # --- samples, scored by the RM: SFT vs PPO vs DPO on 16 held-out prompts ---------------------------
    t = time.perf_counter()
    rm = RewardModel.load(OUT / "rm")
    sample_prompts = [p.prompt for p in held[:16]]
    policies = {"sft": OUT / "sft", "ppo": OUT / "ppo", "dpo": OUT / "dpo"}
    outs = {}
    for name, d in policies.items():
        if (d / "model.safetensors").is_file():
            outs[name] = generate(d, sample_prompts)
            fig[f"rm_score_{name}_samples"] = sum(rm.score(sample_prompts, outs[name])) / len(sample_prompts)
    for k in range(2):
        print(f"--- prompt: {sample_prompts[k][-1]['content'][:120]!r}")
        for name, texts in outs.items():
            print(f"  {name:>3}: {texts[k][:160]!r}")
    times["samples"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all

    print("\n| figure | value |\n|---|---|")
    for k, v in fig.items():
        print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if fig.get("sft_val_loss_before"):
        print(f"| sft val loss ratio (after / before) | {fig['sft_val_loss'] / fig['sft_val_loss_before']:.3f} |")
    print("| time (s) | " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + " |")
    (OUT / "summary.json").write_text(json.dumps({"figures": fig, "seconds": times}, indent=2))


if __name__ == "__main__":
    main()
