"""The instructgpt recipe's measurements: reward-model accuracy on test pairs and its baselines, each policy
judged on held-out prompts, the PPO checkpoints' KL-vs-reward curve and the alignment tax. Each result is
cached under the recipe's folder (measure/), so a rerun only measures what is new."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from gptlab.fileio import atomic_write_json, read_json


def _cached(path: Path, fn):
    if path.is_file():
        return read_json(path, "measurement")
    res = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, res)
    return res


def rm_accuracy(rm_dir: Path, test: Path) -> float:
    """Pairwise accuracy of a reward model on the test pairs (a tie counts half)."""
    from gptlab.align.data import load_preferences
    from gptlab.align.reward import RewardModel

    return RewardModel.load(rm_dir).score_preferences(load_preferences(test, quiet=True), batch_size=32)[1]


def _last_reply(text: str) -> str:
    return text.rsplit("\n\nAssistant:", 1)[-1].strip()


def baselines(train: Path, test: Path) -> dict:
    """"Shorter reply wins" and TF-IDF + logistic regression on the reply difference (trained on `train`)."""
    import numpy as np
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def pairs(path: Path) -> list[tuple[str, str]]:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [(_last_reply(r["chosen"]), _last_reply(r["rejected"])) for r in rows]

    tr, te = pairs(train), pairs(test)
    shorter = sum(1.0 if len(c) < len(r) else 0.5 if len(c) == len(r) else 0.0 for c, r in te) / len(te)
    vec = TfidfVectorizer(min_df=2, ngram_range=(1, 2), sublinear_tf=True).fit([t for p in tr for t in p])
    diff = lambda ps: vec.transform([c for c, _ in ps]) - vec.transform([r for _, r in ps])  # noqa: E731
    d = diff(tr)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(vstack([d, -d]), np.r_[np.ones(len(tr)), np.zeros(len(tr))])
    return {"shorter reply wins": shorter, "TF-IDF + logistic regression": float((clf.decision_function(diff(te)) > 0).mean())}


def _policy(run_dir: Path, ckpt: Path | None = None):
    """A policy (any run: the pretrained one gets the chat tokens, never trained) and its tokenizer."""
    from gptlab.chat.template import add_chat_tokens
    from gptlab.run.format import MODEL_FILE, load_state_into, read_safetensors
    from gptlab.stage.models import load_pretrained

    model, tok = load_pretrained(run_dir)
    tok, _ = add_chat_tokens(tok, model)
    if ckpt is not None:  # a PPO checkpoint holds actor.* and critic.*
        sd = read_safetensors(ckpt / MODEL_FILE, "model weights")
        load_state_into(model, {k[len("actor."):]: v for k, v in sd.items() if k.startswith("actor.")}, ckpt)
    return model.eval(), tok


def _judged(policy, tok, sft, rm, judge, prompts: list, s: dict, seed: int = 1234) -> dict:
    """Seeded samples (temperature 1, as PPO samples) on the held-out prompts -> the policy's own reward
    model's score, the judge's, the KL from the SFT model (exact, summed over the response), length."""
    from gptlab.align.experience import ExperienceConfig, ExperienceMaker
    from gptlab.align.ppo import fit_prompts

    prompts = fit_prompts(tok, prompts, policy.cfg.block_size, s["ppo"]["max_new_tokens"])[0]  # as PPO fits them
    cfg = ExperienceConfig(max_new_tokens=s["ppo"]["max_new_tokens"], advantage="rloo", missing_end_penalty=None)
    maker = ExperienceMaker(policy, None, sft, tok, cfg, reward_model=rm)
    exp = maker.make(prompts, 0.0, seed=seed)
    judged = judge.score(prompts, exp.responses, batch_size=32)
    st = exp.stats
    return {"reward": st["score_mean"], "judge": sum(judged) / len(judged), "judge_scores": judged, "kl": st["kl_exact"],
            "length": st["response_length"], "ended": st["ended_fraction"],
            "samples": [{"prompt": p[-1]["content"], "response": r, "judge": round(j, 3)}
                        for p, r, j in zip(prompts[:3], exp.responses[:3], judged[:3])]}


def _models(sft_dir: Path, rm_dir: Path, judge_dir: Path):
    from gptlab.align.reward import RewardModel

    return _policy(sft_dir)[0], RewardModel.load(rm_dir), RewardModel.load(judge_dir)


def policy_eval(out: Path, name: str, run_dir: Path, sft_dir: Path, rm_dir: Path, judge_dir: Path, prompts: Path,
                s: dict) -> dict:
    from gptlab.align.data import load_prompts

    def measure():
        policy, tok = _policy(run_dir)
        with torch.no_grad():
            return _judged(policy, tok, *_models(sft_dir, rm_dir, judge_dir), load_prompts(prompts), s)

    return _cached(out / "measure" / f"policy-{name.replace(' ', '_')}.json", measure)


def checkpoint_curve(out: Path, ppo_dir: Path, sft_dir: Path, rm_dir: Path, judge_dir: Path, prompts: Path,
                     s: dict) -> list[dict]:
    """The SFT model (step 0) and every PPO checkpoint: KL from SFT, the proxy's reward, the judge's."""
    from gptlab.align.data import load_prompts

    def measure():
        sft, rm, judge = _models(sft_dir, rm_dir, judge_dir)
        convs = load_prompts(prompts)
        points = []
        with torch.no_grad():
            for step, ckpt in [(0, None)] + sorted((int(c.name.split("_")[1]), c)
                                                   for c in (ppo_dir / "checkpoints").glob("step_*")):
                policy, tok = _policy(sft_dir if ckpt is None else ppo_dir, ckpt)
                r = _judged(policy, tok, sft, rm, judge, convs, s)
                se = statistics.stdev(r["judge_scores"]) / len(r["judge_scores"]) ** 0.5
                points.append({"step": step, **{k: r[k] for k in ("reward", "judge", "kl", "length")}, "judge_se": se})
        return points

    return _cached(out / "measure" / "curve.json", measure)


def tax(out: Path, data: Path, runs: dict[str, Path]) -> dict:
    """Pretraining perplexity (the validation split of the pretraining corpus) of each model."""
    from gptlab.compress.report import val_perplexity

    def measure():
        with torch.no_grad():
            return {name: val_perplexity(_policy(d)[0], data, 1 << 20)["val_ppl"] for name, d in runs.items()}

    return _cached(out / "measure" / "tax.json", measure)
