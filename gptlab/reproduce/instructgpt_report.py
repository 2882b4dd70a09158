"""The instructgpt recipe's claims, tables and figures, from its measured numbers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from gptlab.reproduce.report import Claim, Reproduction


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def win_rate(a: dict, b: dict) -> float:
    """How often the judge prefers policy a's response to policy b's on the same prompt (a tie counts half)."""
    pairs = list(zip(a["judge_scores"], b["judge_scores"]))
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)


def _over_optimisation(curve: list[dict]) -> tuple[bool | None, str, str]:
    """(holds, what we measured, why): the proxy keeps rising while the judge's reward peaks and falls."""
    peak = max(curve, key=lambda p: p["judge"])
    last = curve[-1]
    measured = (f"judge peaks at step {peak['step']} (KL {peak['kl']:.2f}, judge {peak['judge']:+.3f}); at the last "
                f"checkpoint (KL {last['kl']:.2f}) judge {last['judge']:+.3f}, own reward model "
                f"{curve[0]['reward']:+.3f} → {last['reward']:+.3f}")
    if peak is last:
        return False, measured, "the judge's reward still rises at the last checkpoint: no over-optimisation " \
                                "within this KL budget (more PPO iterations or a smaller KL penalty would reach it)"
    noise = 2 * math.hypot(peak["judge_se"], last["judge_se"])
    fell = peak["judge"] - last["judge"] > noise
    return last["reward"] >= peak["reward"] and fell, measured, "" if fell else \
        f"the judge's fall after its peak ({peak['judge'] - last['judge']:.3f}) is within noise (±{noise:.3f})"


def _length_caveat(m: dict) -> str:
    """PPO's replies getting much shorter is worth a word: the preference data favours shorter replies too."""
    pol, short = m["policies"], m["accuracy"]["shorter reply wins"]
    if pol["PPO"]["length"] >= 0.75 * pol["SFT"]["length"]:
        return ""
    return (f"PPO's replies are shorter ({pol['PPO']['length']:.0f} vs {pol['SFT']['length']:.0f} tokens) and end "
            f"more often ({100 * pol['PPO']['ended']:.0f}% vs {100 * pol['SFT']['ended']:.0f}%); the shorter reply "
            f"is the chosen one in {100 * short:.0f}% of test pairs, so part of the gain is length")


def _claims(m: dict) -> list[Claim]:
    acc, pol, tax = m["accuracy"], m["policies"], m["tax"]
    rm, short, tfidf = acc["reward model (A)"], acc["shorter reply wins"], acc["TF-IDF + logistic regression"]
    n = m["pairs"]["test"]
    se = math.sqrt(rm * (1 - rm) / n)
    ppo_sft = win_rate(pol["PPO"], pol["SFT"])
    ppo_d = [a - b for a, b in zip(pol["PPO"]["judge_scores"], pol["SFT"]["judge_scores"])]
    sft_pre = win_rate(pol["SFT"], pol["pretrained"])
    claims = [
        Claim("A reward model trained on human comparisons predicts held-out human preferences (here: ≥ 60%, "
              "above the \"shorter reply wins\" heuristic)", "72.4% ± 0.4% held-out accuracy (6B RM, InstructGPT "
              "§4 / Table 14)", f"{100 * rm:.1f}% ± {100 * se:.1f} on {n} test pairs; shorter reply wins "
              f"{100 * short:.1f}%, TF-IDF {100 * tfidf:.1f}%", rm >= 0.60 and rm > short + 2 * se,
              "" if rm >= 0.60 and rm > short + 2 * se else
              f"{m['pairs']['rm']} comparisons and a {m['params'] / 1e6:.1f}M model trained on "
              f"{m['corpus_tokens'] / 1e6:.1f}M tokens of dialogue are too little to learn harmlessness"),
        Claim("SFT on demonstrations beats the pretrained model", "labellers prefer SFT 175B to prompted GPT-3 "
              "(Figure 1)", f"judge prefers SFT to pretrained on {100 * sft_pre:.0f}% of held-out prompts",
              sft_pre > 0.5 + 1 / math.sqrt(len(pol["SFT"]["judge_scores"]))),
        Claim("PPO against the reward model beats SFT, by a judge it was not trained against",
              "PPO 1.3B preferred to SFT 175B; PPO 175B preferred to SFT 175B ~70% of the time (Figure 1)",
              f"judge prefers PPO to SFT on {100 * ppo_sft:.0f}% of held-out prompts; mean judge reward "
              f"{pol['SFT']['judge']:+.3f} → {pol['PPO']['judge']:+.3f} (± {_se(ppo_d):.3f})",
              statistics.fmean(ppo_d) > 2 * _se(ppo_d), _length_caveat(m)),
    ]
    holds, measured, why = _over_optimisation(m["curve"])
    claims.append(Claim("Optimising a proxy reward model too hard over-optimises it: its own reward keeps rising "
                        "while the true (held-out) preference peaks and then falls as the KL grows",
                        "Gao et al. 2022, Figure 1; InstructGPT's KL penalty exists to prevent it", measured, holds, why))
    tax_ok = tax["PPO"] > tax["SFT"]
    claims.append(Claim("RL fine-tuning costs pretraining performance (the alignment tax), and PPO-ptx (mixing in "
                        "the pretraining loss) reduces it", "PPO regresses on public NLP datasets; PPO-ptx "
                        "mitigates most of it (Figure 29)",
                        f"pretraining perplexity: pretrained {tax['pretrained']:.1f}, SFT {tax['SFT']:.1f}, PPO "
                        f"{tax['PPO']:.1f}, PPO-ptx {tax['PPO-ptx']:.1f}",
                        tax_ok and tax["PPO-ptx"] < tax["PPO"],
                        "" if tax_ok else "PPO did not raise the pretraining perplexity over SFT's here: no tax to "
                                          "reduce at this KL"))
    if "PPO round 2" in pol:
        r2 = win_rate(pol["PPO round 2"], pol["PPO"])
        claims.append(Claim("Reward modelling and PPO can be iterated: comparisons of the current policy's samples "
                            "train a new reward model and the next PPO round", "InstructGPT §3.5: steps 2 and 3 "
                            "\"can be iterated continuously\" (no figure)",
                            f"judge prefers round 2 to round 1 on {100 * r2:.0f}% of prompts; judge reward "
                            f"{pol['PPO']['judge']:+.3f} → {pol['PPO round 2']['judge']:+.3f}",
                            r2 > 0.5 + 1 / math.sqrt(len(pol["PPO"]["judge_scores"])),
                            "round 2's comparisons are ranked by the judge (our stand-in for labellers), so the "
                            "judge is not independent of round 2"))
    return claims


def _figure(out: Path, curve: list[dict]) -> dict:
    from gptlab.plot import Line, Panel, plot

    kl = [p["kl"] for p in curve]
    png = plot(out / "reward_vs_kl.png", [Panel(
        [Line("the policy's reward model (proxy, half A)", kl, [p["reward"] for p in curve], "o-"),
         Line("the judge (half B, never optimised against)", kl, [p["judge"] for p in curve], "o-")],
        title="PPO checkpoints on held-out prompts (step 0: SFT)", xlabel="KL(policy ‖ SFT), nats per response",
        ylabel="reward (each model's own scale)")])
    return {"Reward against KL along PPO: the proxy the policy optimises and the independent judge "
            "(Gao et al. Figure 1 shape)": png}


def report(out: Path, s: dict, m: dict, paper: str, seconds: float) -> Reproduction:
    acc = ["| predictor | test-pair accuracy |", "|---|---|"]
    acc += [f"| {k} | {100 * v:.1f}% |" for k, v in m["accuracy"].items() if v is not None]
    pol = ["| policy | judge reward | own reward model | KL from SFT | length (tokens) | ended | judge prefers it to "
           "SFT |", "|---|---|---|---|---|---|---|"]
    for name, p in m["policies"].items():
        wr = "—" if name == "SFT" else f"{100 * win_rate(p, m['policies']['SFT']):.0f}%"
        pol.append(f"| {name} | {p['judge']:+.3f} | {p['reward']:+.3f} | {p['kl']:.2f} | {p['length']:.1f} | "
                   f"{100 * p['ended']:.0f}% | {wr} |")
    cur = ["| PPO step | KL from SFT | own reward model | judge |", "|---|---|---|---|"]
    cur += [f"| {p['step']} | {p['kl']:.2f} | {p['reward']:+.3f} | {p['judge']:+.3f} |" for p in m["curve"]]
    tax = ["| model | pretraining perplexity |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in m["tax"].items()]
    samples = ["| policy | prompt (last turn) | response | judge |", "|---|---|---|---|"]
    clean = lambda t: t.replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    for name, p in m["policies"].items():
        samples += [f"| {name} | {clean(x['prompt'])} | {clean(x['response'])} | {x['judge']:+.2f} |" for x in p["samples"][:1]]
    q = s["ppo"]
    setup = (f"Data: the {sum(m['pairs'].values()):,} HH-RLHF harmless comparisons in ../shared/data, shuffled once "
             f"and cut into {m['pairs']['test']} test pairs, half A ({m['pairs']['rm']}: SFT demonstrations, the "
             f"policy's reward model, PPO prompts) and half B ({m['pairs']['judge']}: the judge). A GPT-2-architecture "
             f"{s['layers']} × {s['width']} model (context {s['context']}, byte-level BPE of {s['bpe']:,} merges) is "
             f"pretrained for {s['steps']} steps on the dialogues of A and B ({m['corpus_tokens'] / 1e6:.2f}M "
             f"tokens; validation loss {m['pretrain_val_loss']:.3f}), then SFT on A's chosen dialogues "
             f"({s['sft_epochs']:g} epochs), reward models from the SFT model ({s['rm_epochs']:g} epochs; "
             f"InstructGPT's pairwise loss), `gptlab rlhf` with {s['rounds']} rounds of PPO ({q['iterations']} "
             f"iterations × {q['rollout_prompts']} prompts, ≤ {q['max_new_tokens']} tokens, β = {q['kl_coef']}, "
             f"actor lr {q['actor_lr']:g}; KL reference: the SFT model), and PPO-ptx (ptx coefficient "
             f"{s['ptx_coef']:g}). Policies are judged on {len(m['policies']['SFT']['judge_scores'])} prompts of the "
             "test pairs, one sample each at temperature 1 with the same seed; the judge's reward is a second "
             "reward model, trained on half B only, that no policy optimises (round 2 excepted, see below).")
    tables = {"Predicting held-out human preferences": "\n".join(acc), "Policies, judged": "\n".join(pol),
              "PPO checkpoints (round 1)": "\n".join(cur), "Alignment tax": "\n".join(tax),
              "One sample each (the first held-out prompt; offensive prompts come from the dataset)": "\n".join(samples)}
    return Reproduction("instructgpt", paper, setup, _claims(m), tables, _figure(out, m["curve"]), m, seconds)
