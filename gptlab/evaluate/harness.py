"""Running a task: zero-, one- and few-shot evaluation without gradient updates (GPT-3's in-context learning).

Prompt = description + K demonstrations (prompt, target delimiter, answer, few-shot delimiter) + the
example's prompt, laid out exactly as lm-evaluation-harness lays out a plain-text (non-chat) prompt.

- multiple_choice: each choice is scored as the continuation `target_delimiter + choice`.
  acc ranks choices by summed log-likelihood; acc_norm by log-likelihood per character of the choice (lm-eval's
  acc_norm); acc_uncond by log P(choice | prompt) - log P(choice | uncond_context), GPT-3's normalisation
  (lm-eval's acc_mutual_info when uncond_context is ""); f1 / mcc from the acc predictions, as GLUE reports
  them (binary F1 of choice 1; macro F1 with more choices). Ties go to the first choice.
- last_word: acc = every token of the target word is the greedy choice; perplexity = exp(-mean log p(word)).
- generate: decoded with gptlab.generate (greedy unless the decoding options say otherwise), exact match
  of the stripped text against any accepted answer.
Means come with their standard error (sample std / sqrt(n)), as lm-eval reports them.
"""

from __future__ import annotations

import math
import string
import sys
from typing import Callable

from gptlab.errors import GptlabError
from gptlab.evaluate.fewshot import DemoSampler, fit_shots
from gptlab.evaluate.scoring import encode_pair, score_pairs
from gptlab.evaluate.tasks import Task


def build_context(task: Task, doc: dict, demos: list[dict]) -> str:
    shown = "".join(task.render(d) + task.target_delimiter + task.answer_text(d) + task.fewshot_delimiter for d in demos)
    return task.description + shown + task.render(doc)


def mean_stderr(xs: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda j: (xs[j], -j))  # the first of equal maxima, like np.argmax


def f1_score(gold: list[int], pred: list[int], n_classes: int) -> float:
    def f1(c: int) -> float:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1(1) if n_classes == 2 else sum(f1(c) for c in range(n_classes)) / n_classes


def matthews_corrcoef(gold: list[int], pred: list[int], n_classes: int) -> float:
    """Multi-class MCC (Gorodkin's R_K; the usual phi coefficient for two classes), 0 when undefined."""
    n = len(gold)
    t = [sum(g == k for g in gold) for k in range(n_classes)]
    p = [sum(q == k for q in pred) for k in range(n_classes)]
    c = sum(g == q for g, q in zip(gold, pred))
    num = c * n - sum(a * b for a, b in zip(t, p))
    den = math.sqrt(n * n - sum(b * b for b in p)) * math.sqrt(n * n - sum(a * a for a in t))
    return num / den if den else 0.0


def _normalise(s: str, task: Task) -> str:
    s = s.strip()
    if task.ignore_case:
        s = s.lower()
    if task.ignore_punctuation:
        s = s.translate(str.maketrans("", "", string.punctuation)).strip()
    return s


def _progress(total: int, desc: str, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)
    return bar.update, bar.close


def run_task(model, tokenizer, task: Task, shots: int = 0, seed: int = 1234, limit: int | None = None,
             batch_size: int = 16, data_root=None, sampling: dict | None = None, generator=None,
             log_samples: bool = False, progress: bool = False) -> dict:
    """Evaluate `model` (a gptlab GPT) on `task` with `shots` demonstrations per example. `sampling`
    overrides the task's decoding options (SamplingParams fields) for generate tasks. Returns a dict with
    the metrics (and, with log_samples, one record per example)."""
    if shots < 0:
        raise GptlabError(f"--shots must be ≥ 0, got {shots}")
    if limit is not None and limit < 1:
        raise GptlabError(f"--limit must be ≥ 1, got {limit}")
    test, pool, same = task.splits(data_root)
    test = test[:limit] if limit else test
    T = model.cfg.block_size
    params = None
    if task.type == "generate":
        from gptlab.generate import SamplingParams

        params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 32, "stop": ("\n",), **task.generation,
                                   **(sampling or {})})
        if params.max_new_tokens >= T:
            raise GptlabError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the context of {T}")

    # prompts: K demonstrations each, fewer where K would overflow the window
    sampler = DemoSampler(pool, seed, same)
    contexts, used, truncated = [], [], 0
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    for doc in test:
        demos = sampler.sample(shots, doc)
        if task.type == "multiple_choice":
            tails = [task.target_delimiter + c for c in task.choice_texts(doc)]
            tail, budget = max(tails, key=lambda t: len(tokenizer.encode(t))), T + 1  # the longest in tokens
        elif task.type == "last_word":
            tail, budget = task.target_delimiter + task.targets(doc)[0], T + 1
        else:
            tail, budget = "", T - params.max_new_tokens
        k = fit_shots(lambda j: count(build_context(task, doc, demos[:j]) + tail), len(demos), budget)
        if k == 0 and count(build_context(task, doc, []) + tail) > budget:
            truncated += 1  # even the bare prompt is too long: its most recent tokens are kept
        contexts.append(build_context(task, doc, demos[:k]))
        used.append(k)

    run = {"multiple_choice": _multiple_choice, "last_word": _last_word, "generate": _generate}[task.type]
    metrics, samples = run(model, tokenizer, task, test, contexts, batch_size, progress, params=params, generator=generator)
    out = {"task": task.name, "type": task.type, "n": len(test), "shots": shots, "seed": seed,
           "shots_used": {"mean": sum(used) / len(used), "min": min(used), "max": max(used)},
           "truncated": truncated, "metrics": metrics}
    if log_samples:
        for s, ctx, k in zip(samples, contexts, used):
            s["context"], s["shots"] = ctx, k
        out["samples"] = samples
    return out


def _with_stderr(values: dict[str, list[float]]) -> dict:
    out = {}
    for name, xs in values.items():
        out[name] = sum(xs) / len(xs)
        out[f"{name}_stderr"] = mean_stderr(xs)
    return out


def _multiple_choice(model, tok, task: Task, docs, contexts, batch_size, progress, **_):
    wanted = list(task.metrics) or ["acc", "acc_norm"] + (["acc_uncond"] if task.uncond_context is not None else [])
    if "acc_uncond" in wanted and task.uncond_context is None:
        raise GptlabError(f"{task.name}: acc_uncond needs an 'uncond_context' (e.g. \"Answer:\"; \"\" = the document start)")
    uncond = "acc_uncond" in wanted
    pairs, spans = [], []
    for doc, ctx in zip(docs, contexts):
        choices = task.choice_texts(doc)
        start = len(pairs)
        pairs += [encode_pair(tok, ctx, task.target_delimiter + c) for c in choices]
        if uncond:
            pairs += [encode_pair(tok, task.uncond_context, task.target_delimiter + c) for c in choices]
        spans.append((start, choices))
    tick, close = _progress(len(pairs), task.name, progress)
    scores = score_pairs(model, pairs, batch_size, tok.vocab_size, progress=tick)
    close()
    per = {"acc": [], "acc_norm": [], "acc_uncond": []}
    golds, preds, samples = [], [], []
    for doc, (start, choices) in zip(docs, spans):
        n = len(choices)
        lls = [s.logprob for s in scores[start:start + n]]
        gold = task.gold(doc)
        pred, pred_norm = argmax(lls), argmax([ll / max(1, len(c)) for ll, c in zip(lls, choices)])
        per["acc"].append(float(pred == gold))
        per["acc_norm"].append(float(pred_norm == gold))
        rec = {"gold": gold, "choices": choices, "loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm}
        if uncond:
            llu = [s.logprob for s in scores[start + n:start + 2 * n]]
            pred_u = argmax([a - b for a, b in zip(lls, llu)])
            per["acc_uncond"].append(float(pred_u == gold))
            rec |= {"uncond_loglikelihoods": llu, "pred_uncond": pred_u}
        golds.append(gold)
        preds.append(pred)
        samples.append(rec)
    metrics = _with_stderr({m: per[m] for m in ("acc", "acc_norm", "acc_uncond") if m in wanted})
    n_classes = max(len(s["choices"]) for s in samples)
    if "f1" in wanted:
        metrics["f1"] = f1_score(golds, preds, n_classes)
    if "mcc" in wanted:
        metrics["mcc"] = matthews_corrcoef(golds, preds, n_classes)
    return metrics, samples


def _last_word(model, tok, task: Task, docs, contexts, batch_size, progress, **_):
    targets = [task.targets(doc)[0] for doc in docs]
    pairs = [encode_pair(tok, ctx, task.target_delimiter + t) for ctx, t in zip(contexts, targets)]
    tick, close = _progress(len(pairs), task.name, progress)
    scores = score_pairs(model, pairs, batch_size, tok.vocab_size, progress=tick)
    close()
    lls = [s.logprob for s in scores]
    metrics = _with_stderr({"acc": [float(s.greedy) for s in scores]})
    metrics["perplexity"] = math.exp(-sum(lls) / len(lls))
    samples = [{"target": t, "loglikelihood": s.logprob, "tokens": s.n_tokens, "greedy": s.greedy}
               for t, s in zip(targets, scores)]
    return metrics, samples


def _generate(model, tok, task: Task, docs, contexts, batch_size, progress, params=None, generator=None, **_):
    from gptlab.generate import Generator

    gen = generator or Generator(model, tok)
    keep = model.cfg.block_size - params.max_new_tokens
    prompts = [tok.encode(c)[-keep:] for c in contexts]  # an over-long prompt keeps its most recent tokens
    tick, close = _progress(len(prompts), task.name, progress)
    outs = []
    for b in range(0, len(prompts), batch_size):
        outs += gen.generate(prompts[b:b + batch_size], params)
        tick(len(prompts[b:b + batch_size]))
    close()
    ems, samples = [], []
    for doc, out in zip(docs, outs):
        answers = task.targets(doc)
        hit = any(_normalise(out.text, task) == _normalise(a, task) for a in answers)
        ems.append(float(hit))
        samples.append({"targets": answers, "prediction": out.text, "exact_match": hit})
    return _with_stderr({"exact_match": ems}), samples


def evaluate_tasks(model, tokenizer, tasks: list[Task], **kw) -> dict[str, dict]:
    """run_task for each task; results keyed by task name (a repeated name gets a #2, #3 suffix)."""
    results: dict[str, dict] = {}
    for task in tasks:
        key, i = task.name, 1
        while key in results:
            i += 1
            key = f"{task.name}#{i}"
        results[key] = run_task(model, tokenizer, task, **kw)
    return results
