"""The gpt2 recipe's claims, tables and figures, from its measured numbers."""

from __future__ import annotations

import math
from pathlib import Path

from gptlab.reproduce.report import Claim, Reproduction


def _rising(xs: list[float], margin: float = 0.0) -> bool:
    return all(b > a + margin for a, b in zip(xs, xs[1:]))


def _figures(out: Path, m: dict) -> dict:
    from gptlab.plot import Line, Panel, plot

    sizes = list(m["sizes"].values())
    n = [z["params"] for z in sizes]
    fit = m["fit"]
    grid = [n[0] * (n[-1] / n[0]) ** (i / 20) for i in range(21)]
    loss_png = plot(out / "loss_vs_params.png", [Panel(
        [Line("measured", n, [z["val_loss"] for z in sizes], "o"),
         Line(f"fit: L = {fit['a']:.2f} · N^-{fit['alpha']:.3f}", grid, [fit["a"] * x ** -fit["alpha"] for x in grid], "--")],
        title="validation loss against non-embedding parameters (one corpus, one token budget)",
        xlabel="non-embedding parameters N (log scale)", ylabel="validation loss (nats/token, log scale)",
        xscale="log", yscale="log")])
    lines = [Line("last word (held-out passages)", n, [100 * z["last_word_acc"] for z in sizes], "o-")]
    if m["sst2"]:
        lines.append(Line("SST-2 prompt", n, [100 * z["sst2_acc"] for z in sizes], "o-"))
    zero_png = plot(out / "zero_shot_vs_params.png", [Panel(
        lines, title="zero-shot accuracy against model size", xlabel="non-embedding parameters N (log scale)",
        ylabel="accuracy (%)", xscale="log", hlines=[(50.0, "chance (SST-2)")] if m["sst2"] else [])])
    return {"Validation loss against parameters, with the fitted power law (GPT-2 / Kaplan et al. Figure 1 shape)": loss_png,
            "Zero-shot accuracy against parameters (GPT-2 Figure 1 shape)": zero_png}


def _claims(m: dict, kaplan_alpha: float) -> list[Claim]:
    sizes = list(m["sizes"].values())
    names = list(m["sizes"])
    fit = m["fit"]
    loss = [z["val_loss"] for z in sizes]
    lw = [z["last_word_acc"] for z in sizes]
    claims = [
        Claim("Perplexity falls steadily with model size on the same data (GPT-2 Table 3: every dataset improves "
              "from 117M to 1.5B)", "WikiText-103 perplexity 37.5 → 17.5 from 117M to 1.5B",
              " → ".join(f"{math.exp(v):.1f}" for v in loss) + f" validation perplexity ({names[0]} … {names[-1]})",
              _rising([-v for v in loss])),
        Claim("Loss follows a power law in non-embedding parameters, L ∝ N^-α", f"α_N ≈ {kaplan_alpha} (Kaplan et al. "
              "2020, models trained to convergence)", f"α = {fit['alpha']:.3f}, R² = {fit['r2']:.3f} over "
              f"{len(sizes)} sizes", fit["r2"] >= 0.9 and fit["alpha"] > 0,
              "fixed token budget, far from convergence: the larger models are undertrained, so α here is a "
              "compute-limited slope, not the paper's"),
        Claim("Zero-shot last-word prediction (LAMBADA) improves with capacity",
              "LAMBADA accuracy 45.99% → 63.24% from 117M to 1.5B (Table 3)",
              " → ".join(f"{100 * v:.1f}%" for v in lw) + f" on {m['passages']} held-out passages",
              _rising(lw[1:]) and lw[-1] > lw[0],
              "" if _rising(lw[1:]) and lw[-1] > lw[0] else
              f"at most {100 * max(lw):.1f}% exact words: {m['tokens_per_model'] / 1e6:.1f}M tokens of Shakespeare "
              "teach none of these models to copy a word from its context reliably")]
    if m["sst2"]:
        sst = [z["sst2_acc"] for z in sizes]
        best = max(sst)
        claims.append(Claim("Zero-shot task transfer by prompting appears and grows with size (here: SST-2)",
                            "GPT-2's zero-shot transfer rises log-linearly with size on every task (Figure 1)",
                            " → ".join(f"{100 * v:.1f}%" for v in sst) + " SST-2 prompt accuracy",
                            best > 0.55 and sst[-1] >= sst[0] + 0.03,
                            "" if best > 0.55 and sst[-1] >= sst[0] + 0.03 else
                            "Shakespeare holds no film reviews and no “Sentiment:” prompts: nothing to transfer at "
                            "this size; GPT-2's WebText did"))
    return claims


def report(out: Path, s: dict, m: dict, paper: str, kaplan_alpha: float, seconds: float) -> Reproduction:
    bpe = f"byte-level BPE of {s['bpe']:,} merges" if s["bpe"] else "GPT-2 BPE"
    rows = ["| model | non-embedding params | val loss | val perplexity | last-word acc | last-word perplexity | "
            "SST-2 acc |", "|---|---|---|---|---|---|---|"]
    for name, z in m["sizes"].items():
        sst = f"{100 * z['sst2_acc']:.1f}%" if "sst2_acc" in z else "—"
        rows.append(f"| {name} | {z['params'] / 1e6:.2f}M | {z['val_loss']:.3f} | {math.exp(z['val_loss']):.1f} | "
                    f"{100 * z['last_word_acc']:.1f}% | {z['last_word_ppl']:.1f} | {sst} |")
    setup = (f"{len(m['sizes'])} GPT-2-architecture models ({', '.join(m['sizes'])}; pre-LN, final LN, scaled "
             f"residual init, context {s['context']}) each trained by `gptlab pretrain` for {s['steps']} steps of "
             f"{s['batch']} × {s['context']} tokens ({m['tokens_per_model'] / 1e6:.2f}M tokens, the same for every "
             f"size) on the built-in Shakespeare corpus ({bpe}), "
             f"lr {s['lr']:g}, cosine decay. Validation loss: every token of the held-out 5% of the corpus. "
             f"Last word: {m['passages']} passages of {s['passage_words']} words cut from that held-out text, each "
             "ending in a word of ≥ 4 letters that occurs earlier in the passage (passages overlap); the model must "
             "produce the whole word greedily (LAMBADA's metric). "
             + ("SST-2: the built-in `sst2` prompt task on 872 held-out sentences." if m["sst2"] else
                "SST-2: not measured (no ../shared/data/sst2/train.tsv and no --data)."))
    tables = {"Per model": "\n".join(rows)}
    return Reproduction("gpt2", paper, setup, _claims(m, kaplan_alpha), tables, _figures(out, m), m, seconds)
