"""gptlab evaluate: scoring, rolling perplexity, bits per byte, few-shot prompts, task metrics, the task format
(SST-2 on the real file), the CLI, and parity with lm-evaluation-harness (offline, local JSON tasks)."""

from __future__ import annotations

import argparse
import json
import math
import random
import socket
from pathlib import Path

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.evaluate import (DemoSampler, Score, bits_per_byte, build_context, encode_pair, fit_shots, load_task,
                             loglikelihood_rolling, rolling_pairs, run_task, score_pairs, text_perplexity)
from gptlab.evaluate.cli import add_evaluate_parser
from gptlab.model import GPT, GPTConfig
from gptlab.run import write_run_config
from gptlab.tokenizer import CharTokenizer, train_bpe
from gptlab.run.format import MODEL_FILE, save_model

WORDS = "the a cat dog sat ran on under mat log red blue big small quickly slowly house tree river".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is ~50× faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_bpe([_sentence(rng, 60) + " Question: Answer: Sentence: Sentiment: positive negative?\n"
                      for _ in range(40)], 80, progress=False)


def _model(vocab: int, block: int = 64, attention=("dense",), seed: int = 0, noise: float = 0.3) -> GPT:
    """A tiny random GPT, perturbed so its predictions are peaked (no near-ties between choices)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32, attention=attention,
                      local_window=6))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape) * noise)
    return m.eval()


def _uniform(vocab: int, block: int = 64) -> GPT:
    """All weights zero: every next-token distribution is uniform, so log p = -ln(vocab) per token."""
    m = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def _naive(model: GPT, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One full forward, lm-eval's truncation: keep the last block_size + 1 tokens, read all but the last."""
    full = (ctx + cont)[-(model.cfg.block_size + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0][0].double(), -1)[-len(cont):]
    tgt = torch.tensor(full[-len(cont):])
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _mc_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        choices = [_sentence(rng, rng.randint(1, 4)) for _ in range(rng.randint(2, 4))]
        rows.append({"question": _sentence(rng, rng.randint(3, 8)) + "?", "choices": choices,
                     "answer": rng.randrange(len(choices))})
    return rows


# ----------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("attention", [("dense",), ("dense", "local")])
def test_scoring_equals_naive_full_forward(attention, monkeypatch):
    V, T = 50, 16
    m = _model(V, T, attention)
    rng = random.Random(1)
    r = lambda n: [rng.randrange(V) for _ in range(n)]  # noqa: E731
    shared = r(5)
    greedy = [3]  # a continuation the model predicts greedily, token by token
    for _ in range(3):
        with torch.no_grad():
            greedy.append(int(m(torch.tensor([shared + greedy]))[0][0, -1].argmax()))
    greedy = greedy[1:]
    pairs = [(shared, r(3)), (shared, r(1)), (shared, r(6)), (shared + [3], greedy), (shared, r(12)),  # shared prefix
             (r(2), r(4)), (r(9), r(7)),  # single pairs
             (r(20), r(5)), (r(14), r(16)), (shared, r(13))]  # longer than the window: left-truncated
    import gptlab.evaluate.scoring as scoring

    for bs, chunk in ((1, 1024), (3, 2), (16, 5)):  # chunk: positions per logits block
        monkeypatch.setattr(scoring, "_LOGIT_CHUNK", chunk)
        for share in (True, False):
            got = score_pairs(m, pairs, batch_size=bs, share_prefix=share)
            for (ctx, cont), s in zip(pairs, got):
                lp, g = _naive(m, ctx, cont)
                assert s.logprob == pytest.approx(lp, abs=1e-4) and s.greedy == g and s.n_tokens == len(cont)
    assert score_pairs(m, [(shared + [3], greedy)])[0].greedy
    assert score_pairs(m, [([1], [])])[0] == Score(0.0, True, 0)
    with pytest.raises(GptlabError, match="does not fit"):
        score_pairs(m, [([1], r(T + 1))])
    with pytest.raises(GptlabError, match="at least one token"):
        score_pairs(m, [([], [1])])
    m.train()
    score_pairs(m, pairs[:2])
    assert m.training  # the caller's mode is restored


def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = encode_pair(tok, "Question: the cat? Answer: ", "dog")
    assert ctx == tok.encode("Question: the cat? Answer:")  # the trailing space moves to the continuation
    assert ctx + cont == tok.encode("Question: the cat? Answer: dog")
    assert encode_pair(tok, "", " dog") == ([tok.eot_id], tok.encode(" dog"))  # empty context: the document start


# ---------------------------------------------------------------------------- perplexity
def test_rolling_windows_predict_every_token_once_with_full_context():
    V, T = 40, 12
    m = _model(V, T)
    toks = [random.Random(2).randrange(V) for _ in range(37)]
    prefix = 7
    for stride in (1, 3, 5, T):
        pairs = rolling_pairs(toks, prefix, T, stride)
        assert [t for _, c in pairs for t in c] == toks  # every token exactly once, in order
        assert all(len(c) + len(k) - 1 <= T for c, k in pairs)  # no window is truncated
        assert all(len(c) >= T - stride + 1 for c, _ in pairs[1:])  # later tokens keep ≥ T - stride context
    # stride 1: every token predicted from everything before it, up to the window (manual, one forward each)
    seq = [prefix] + toks
    manual = 0.0
    with torch.no_grad():
        for i in range(1, len(seq)):
            x = torch.tensor([seq[max(0, i - T):i]])
            manual += float(torch.log_softmax(m(x)[0][0, -1].double(), -1)[seq[i]])
    s = loglikelihood_rolling(m, toks, prefix, stride=1, batch_size=5)
    assert s.n_tokens == len(toks) and s.logprob == pytest.approx(manual, abs=1e-4)
    chunks = loglikelihood_rolling(m, toks, prefix, stride=T)  # disjoint windows: a different, valid number
    assert chunks.n_tokens == len(toks) and chunks.logprob != pytest.approx(manual, abs=1e-3)
    with pytest.raises(GptlabError, match="stride"):
        rolling_pairs(toks, prefix, T, T + 1)


def test_bits_per_byte_on_a_hand_example():
    assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)
    text = "abé ab"  # 6 characters, 7 UTF-8 bytes (é is two)
    tok = CharTokenizer.from_text(text)  # 4 characters + end-of-text = 5 ids
    m = _uniform(tok.vocab_size, block=4)
    r = text_perplexity(m, tok, [text], stride=2).to_dict()
    assert (r["tokens"], r["bytes"], r["words"]) == (6, 7, 2)
    assert r["loss"] == pytest.approx(math.log(5)) and r["perplexity"] == pytest.approx(5.0)
    assert r["bits_per_byte"] == pytest.approx(6 * math.log2(5) / 7)
    assert r["byte_perplexity"] == pytest.approx(5 ** (6 / 7)) and r["word_perplexity"] == pytest.approx(5 ** 3)


# --------------------------------------------------------------------------------- few-shot
def test_demonstrations_are_seeded_exclude_the_example_and_shrink_to_fit(tmp_path, tok):
    docs = [{"q": f"question {i}", "a": i % 2} for i in range(30)]
    draw = lambda seed: [DemoSampler(docs, seed, same_split=True).sample(3, d) for d in docs]  # noqa: E731
    first = draw(5)
    assert first == draw(5) and first != draw(6)
    assert all(d not in demos and len(demos) == 3 for d, demos in zip(docs, first))
    dup = docs + [dict(docs[0])]  # an identical copy of the example is never shown either
    assert all(docs[0] not in DemoSampler(dup, s, True).sample(29, docs[0]) for s in range(5))
    with pytest.raises(GptlabError, match="only"):
        DemoSampler(docs[:3], 0, True).sample(3, docs[0])
    assert fit_shots(lambda k: 10 + 7 * k, 5, 30) == 2 and fit_shots(lambda k: 99, 4, 30) == 0

    # a real task in a small window: K drops where the prompt would not fit, and the prompt always fits
    rows = _mc_rows(3, 12)
    task_file = tmp_path / "mc.yaml"
    task_file.write_text(json.dumps({"name": "mc", "type": "multiple_choice", "template": "Question: {question}\nAnswer:",
                                     "choices": "{choices}", "target": "{answer}", "description": "Answer.\n\n",
                                     "data": {"test": "d.jsonl"}}))
    _write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task(task_file)
    T = 64
    out = run_task(_model(tok.vocab_size, T), tok, task, shots=4, seed=1, log_samples=True)
    assert out["shots_used"]["max"] < 4 and out["truncated"] == 0
    for row, s in zip(rows, out["samples"]):
        longest = max(len(tok.encode(s["context"] + " " + c)) for c in row["choices"])
        assert longest <= T + 1  # the model reads at most T tokens
        assert s["context"].count(task.render(row)) == 1 and s["context"].endswith(task.render(row))
        assert s["context"] == build_context(task, row, []) or s["shots"] > 0
    big = run_task(_model(tok.vocab_size, 512), tok, task, shots=4, seed=1)
    assert big["shots_used"] == {"mean": 4, "min": 4, "max": 4}


# ----------------------------------------------------------------------------------- metrics
def test_acc_and_acc_norm_differ_and_uncond_is_a_difference(tmp_path):
    # uniform model + char tokenizer: log p(" " + choice) = -(len(choice) + 1) ln V exactly
    rows = [{"q": "pick", "choices": ["x", "abcdefghij klmnopqrstuvwxy"], "answer": 1}]
    chars = "".join(sorted(set("Q: pick\nA:xabcdefghijklmnopqrstuvwxy ")))
    tok = CharTokenizer(chars)
    _write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task({"name": "t", "type": "multiple_choice", "template": "Q: {q}\nA:", "choices": "{choices}",
                      "target": "{answer}", "uncond_context": "A:", "metrics": ["acc", "acc_norm", "acc_uncond", "f1", "mcc"],
                      "data": {"test": str(tmp_path / "d.jsonl")}})
    out = run_task(_uniform(tok.vocab_size, 64), tok, task, log_samples=True)
    s = out["samples"][0]
    lnv = math.log(tok.vocab_size)
    assert s["loglikelihoods"] == pytest.approx([-2 * lnv, -27 * lnv])
    assert out["metrics"]["acc"] == 0.0 and out["metrics"]["acc_norm"] == 1.0  # 2/1 per char vs 27/26
    assert s["pred_uncond"] == 0 and out["metrics"]["acc_uncond"] == 0.0  # equal differences: the first choice


def test_last_word_and_generation_tasks(tmp_path, tok):
    m = _model(tok.vocab_size, 64)
    rng = random.Random(4)
    passages = [{"text": _sentence(rng, rng.randint(4, 9))} for _ in range(6)]
    _write_jsonl(tmp_path / "lambada.jsonl", passages)
    task = load_task(f"lambada={tmp_path / 'lambada.jsonl'}")
    out = run_task(m, tok, task, batch_size=4, log_samples=True)
    pairs = [encode_pair(tok, p["text"].rsplit(" ", 1)[0], " " + p["text"].rsplit(" ", 1)[1]) for p in passages]
    ref = [_naive(m, c, k) for c, k in pairs]
    assert out["metrics"]["acc"] == pytest.approx(sum(g for _, g in ref) / 6)
    assert out["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(lp for lp, _ in ref) / 6), rel=1e-5)

    from gptlab.generate import Generator, SamplingParams

    qs = [{"question": _sentence(rng, 4) + "?"} for _ in range(4)]
    gen = Generator(m, tok)
    greedy = gen.generate([f"Q: {q['question']}\nA:" for q in qs], SamplingParams(temperature=0, max_new_tokens=8, stop=("\n",)))
    for i, (q, c) in enumerate(zip(qs, greedy)):  # the model's own answer for even rows, a wrong one for odd rows
        q["answer"] = [c.text.strip(), "zzz"] if i % 2 == 0 else c.text.strip() + " nope"
    _write_jsonl(tmp_path / "qa.jsonl", qs)
    out = run_task(m, tok, load_task(f"qa={tmp_path / 'qa.jsonl'}"), sampling={"max_new_tokens": 8}, batch_size=3,
                   log_samples=True)
    assert out["metrics"]["exact_match"] == 0.5
    assert [s["prediction"] for s in out["samples"]] == [c.text for c in greedy]


# -------------------------------------------------------------------------------- task format
def test_sst2_builtin_reads_the_real_file(shared_data, tok):
    task = load_task("sst2")
    test, pool, same = task.splits(shared_data)
    assert (len(test), len(pool), same) == (872, 67349 - 872, False)
    assert set(test[0]) - {"_line"} == {"label", "sentence"} and {task.gold(d) for d in test} == {0, 1}
    assert task.choice_texts(test[0]) == ["negative", "positive"]
    out = run_task(_model(tok.vocab_size, 256), tok, task, shots=2, limit=4, data_root=shared_data, log_samples=True)
    assert out["n"] == 4 and out["shots_used"]["min"] == 2
    assert set(out["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "f1", "mcc"}
    assert 0 <= out["metrics"]["acc"] <= 1
    ctx = out["samples"][0]["context"]
    assert ctx.startswith("Classify the sentiment") and ctx.endswith(f"Sentence: {test[0]['sentence']}\nSentiment:")
    assert ctx.count("\nSentiment: positive\n\n") + ctx.count("\nSentiment: negative\n\n") == 2
    # another file given on the command line is evaluated whole (e.g. GLUE's 872-line dev.tsv)
    assert len(load_task(f"sst2={shared_data / 'sst2' / 'train.tsv'}").splits()[0]) == 67349


def test_task_files_are_checked():
    with pytest.raises(GptlabError, match="unknown task"):
        load_task("no_such_task")
    base = {"name": "t", "type": "multiple_choice", "template": "{q}", "choices": ["a", "b"], "target": "{a}",
            "data": {"test": "x.jsonl"}}
    with pytest.raises(GptlabError, match="unknown task keys"):
        load_task({**base, "shot": 3})
    with pytest.raises(GptlabError, match="task type"):
        load_task({**base, "type": "cloze"})
    with pytest.raises(GptlabError, match="not found"):
        load_task(base).splits()
    t = load_task(base)
    assert t.gold({"q": "?", "a": "b"}) == 1 and t.gold({"q": "?", "a": 0}) == 0
    with pytest.raises(GptlabError, match="not a choice"):
        t.gold({"q": "?", "a": "c"})
    with pytest.raises(GptlabError, match="lacks"):
        t.render({"x": 1})


# ---------------------------------------------------------------------------------------- CLI
def test_evaluate_command(tmp_path, tok, capsys):
    run = tmp_path / "run"
    m = _model(tok.vocab_size, 64)
    write_run_config(run, m.cfg, tok, stage="test")
    save_model(m, run / MODEL_FILE)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(_sentence(random.Random(5), 80).split()), encoding="utf-8")
    _write_jsonl(tmp_path / "mc.jsonl", _mc_rows(6, 5))
    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["evaluate", str(run), "--perplexity", str(text), "--task", f"multiple_choice={tmp_path / 'mc.jsonl'}",
                      "--shots", "1", "--json", str(tmp_path / "out.json")])
    a.func(a)
    table = capsys.readouterr().out
    assert "bits_per_byte" in table and "acc_uncond" in table and "multiple_choice" in table
    rep = json.loads((tmp_path / "out.json").read_text())
    ppl = rep["perplexity"]
    assert ppl["tokens"] == len(tok.encode(text.read_text())) and ppl["stride"] == 32
    assert ppl["bits_per_byte"] == pytest.approx(ppl["nll_nats"] / (math.log(2) * ppl["bytes"]))
    assert rep["results"]["multiple_choice"]["n"] == 5 and rep["results"]["multiple_choice"]["shots"] == 1
    with pytest.raises(GptlabError, match="nothing to evaluate"):
        a = p.parse_args(["evaluate", str(run)])
        a.func(a)


# ---------------------------------------------------------------------- lm-evaluation-harness
LM_EVAL_MISSING = "lm-evaluation-harness is not installed (pip install gptlab[eval])"


def _require(name: str, reason: str):
    """Import or skip: a missing or broken optional package skips with the reason (and the import error)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{reason}: {e}")


LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: hub/datasets offline, and any attempt to open an internet socket fails the test
    (this machine's loopback, where a test's own server listens, is allowed)."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    real = socket.socket.connect

    real_create = socket.create_connection

    def guard(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
            raise AssertionError(f"network access attempted: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guard)

    def no_connection(address, *args, **kwargs):
        if address[0] not in LOCAL:
            raise AssertionError(f"network access attempted: {address}")
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_connection)


def _saved_run(run: Path, tok, block: int = 128) -> Path:
    """A tiny random model saved as a run directory (what lm-eval, the server and the exporter load)."""
    m = _model(tok.vocab_size, block)
    write_run_config(run, m.cfg, tok, stage="test")
    save_model(m, run / MODEL_FILE)
    return run


def _lm_eval_tasks(tmp_path: Path) -> tuple[Path, Path]:
    """The same multiple-choice data as an lm-eval task YAML and as a gptlab task."""
    rows = _mc_rows(7, 40)
    _write_jsonl(tmp_path / "train.jsonl", rows[:25])
    _write_jsonl(tmp_path / "test.jsonl", rows[25:])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "parity_mc.yaml").write_text(json.dumps({  # JSON is YAML
        "task": "parity_mc", "dataset_path": "json", "test_split": "test", "fewshot_split": "train",
        "dataset_kwargs": {"data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                           "cache_dir": str(tmp_path / "hf_datasets")},
        "output_type": "multiple_choice", "description": "Answer the question.\n\n",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm", "acc_mutual_info")]}))
    mine = tmp_path / "parity_mc.yaml"
    mine.write_text(json.dumps({"name": "parity_mc", "type": "multiple_choice", "description": "Answer the question.\n\n",
                                "template": "Question: {question}\nAnswer:", "choices": "{choices}", "target": "{answer}",
                                "uncond_context": "", "data": {"test": "test.jsonl", "train": "train.jsonl"}}))
    return tmp_path / "tasks", mine


def test_lm_eval_parity(tmp_path, tok, offline):
    lm_eval = _require("lm_eval", LM_EVAL_MISSING)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    import gptlab.evaluate.lm_eval_adapter  # noqa: F401  registers "gptlab"
    from gptlab.run import load_run

    run = _saved_run(tmp_path / "run", tok)
    include, mine = _lm_eval_tasks(tmp_path)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    loaded = load_run(run)
    for shots in (0, 2):
        out = lm_eval.simple_evaluate(model="gptlab", model_args=f"run_dir={run},batch_size=4", tasks=["parity_mc"],
                                      task_manager=tm, num_fewshot=shots, fewshot_random_seed=1234, bootstrap_iters=0,
                                      log_samples=True)
        theirs = out["results"]["parity_mc"]
        ours = run_task(loaded.model, loaded.tokenizer, load_task(mine), shots=shots, seed=1234, log_samples=True)
        assert ours["n"] == theirs["sample_len"] == 15
        assert ours["metrics"]["acc"] == theirs["acc,none"]
        assert ours["metrics"]["acc_norm"] == theirs["acc_norm,none"]
        assert ours["metrics"]["acc_uncond"] == theirs["acc_mutual_info,none"]
        for a, b in zip(out["samples"]["parity_mc"], ours["samples"]):  # same prompts, same scores
            n = len(b["choices"])
            assert a["arguments"][0][0] == b["context"]
            assert [r[0] for r in a["filtered_resps"]][:n] == pytest.approx(b["loglikelihoods"], abs=1e-4)

    # rolling windows with stride = block size are lm-eval's disjoint windows
    toks = list(range(5, 5 + 300))
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 0, 128, 1)]
    assert [(list(c), list(k)) for c, k in ref] == rolling_pairs(toks, 0, 128, 128)


def test_lm_eval_hf_model_on_the_exported_checkpoint_agrees(tmp_path, tok, offline):
    """An independent reference: lm-eval's own Hugging Face model on `gptlab convert --to-hf` of the same run."""
    lm_eval = _require("lm_eval", LM_EVAL_MISSING)
    _require("transformers", "transformers is not installed")
    _require("accelerate", "lm-eval's hf model needs accelerate (pip install accelerate)")
    from lm_eval.tasks import TaskManager

    import gptlab.evaluate.lm_eval_adapter  # noqa: F401
    from gptlab.interop import export_hf

    run = tmp_path / "run"
    m = _model(tok.vocab_size, 128)  # kept: the perplexity check below runs it directly
    write_run_config(run, m.cfg, tok, stage="test")
    save_model(m, run / MODEL_FILE)
    export_hf(run, tmp_path / "hf")
    include, _ = _lm_eval_tasks(tmp_path)
    rng = random.Random(8)
    texts = [{"text": _sentence(rng, 150)} for _ in range(2)]  # longer than the window: several rolling windows
    qs = [{"question": _sentence(rng, 5) + "?", "answer": "x"} for _ in range(4)]
    _write_jsonl(tmp_path / "texts.jsonl", texts)
    _write_jsonl(tmp_path / "qs.jsonl", qs)
    common = {"dataset_path": "json", "test_split": "test"}
    (include / "parity_ppl.yaml").write_text(json.dumps({
        **common, "task": "parity_ppl", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "texts.jsonl")},
                                                           "cache_dir": str(tmp_path / "hf_datasets")},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}))
    (include / "parity_gen.yaml").write_text(json.dumps({
        **common, "task": "parity_gen", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "qs.jsonl")},
                                                           "cache_dir": str(tmp_path / "hf_datasets")},
        "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    tm = TaskManager(include_path=str(include), include_defaults=False)
    res = {}
    for name, args in (("gptlab", f"run_dir={run}"), ("hf", f"pretrained={tmp_path / 'hf'},dtype=float32")):
        res[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["parity_mc", "parity_ppl", "parity_gen"],
                                            task_manager=tm, num_fewshot=0, bootstrap_iters=0, log_samples=True,
                                            device="cpu", batch_size=4)
    a, b = res["gptlab"], res["hf"]
    for metric in ("acc,none", "acc_norm,none", "acc_mutual_info,none"):
        assert a["results"]["parity_mc"][metric] == b["results"]["parity_mc"][metric]
    for sa, sb in zip(a["samples"]["parity_mc"], b["samples"]["parity_mc"]):
        assert [r[0] for r in sa["filtered_resps"]] == pytest.approx([r[0] for r in sb["filtered_resps"]], abs=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert a["results"]["parity_ppl"][metric] == pytest.approx(b["results"]["parity_ppl"][metric], rel=1e-5)
    assert [s["resps"] for s in a["samples"]["parity_gen"]] == [s["resps"] for s in b["samples"]["parity_gen"]]
    # and gptlab's own perplexity with lm-eval's windows gives lm-eval's bits per byte
    ours = text_perplexity(m.eval(), tok, [t["text"] for t in texts], stride=128).to_dict()
    assert ours["bits_per_byte"] == pytest.approx(a["results"]["parity_ppl"]["bits_per_byte,none"], rel=1e-5)


def test_adapter_without_lm_eval_says_how_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "gptlab.evaluate.lm_eval_adapter", raising=False)
    with pytest.raises(GptlabError, match=r"pip install gptlab\[eval\]"):
        importlib.import_module("gptlab.evaluate.lm_eval_adapter")



def test_lm_eval_scores_gptlab_serve_like_the_in_process_adapter(tmp_path, tok, offline):
    """lm-evaluation-harness's own `local-completions` client (echo + logprobs, its remote tokenizer through
    /tokenizer_info, /tokenize and /detokenize) against a real `gptlab serve`: the same accuracies and
    loglikelihoods as the in-process adapter."""
    lm_eval = _require("lm_eval", LM_EVAL_MISSING)
    _require("uvicorn", "serving is not installed")
    import subprocess
    import sys
    import time

    import httpx
    from lm_eval.tasks import TaskManager

    import gptlab.evaluate.lm_eval_adapter  # noqa: F401

    run = _saved_run(tmp_path / "run", tok)
    include, _ = _lm_eval_tasks(tmp_path)
    tm = TaskManager(include_path=str(include), include_defaults=False)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run), "--port", str(port), "--model-name", "m",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        kw = dict(tasks=["parity_mc"], task_manager=tm, num_fewshot=2, fewshot_random_seed=1234, bootstrap_iters=0,
                  log_samples=True)
        served = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=m,"
            "tokenizer_backend=remote,max_length=128,num_concurrent=1,max_retries=1", **kw)
        local = lm_eval.simple_evaluate(model="gptlab", model_args=f"run_dir={run},batch_size=4", **kw)
    finally:
        proc.terminate()
        proc.wait(10)
    a, b = served["results"]["parity_mc"], local["results"]["parity_mc"]
    assert a["sample_len"] == b["sample_len"] == 15
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    for x, y in zip(served["samples"]["parity_mc"], local["samples"]["parity_mc"]):
        assert x["arguments"] == y["arguments"]
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-4)
