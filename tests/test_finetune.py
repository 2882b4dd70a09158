"""GPT-1 fine-tuning: input transformations, heads, L3 = L2 + λ·L1, data, resume, predictions, bad input."""

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.finetune.cli import add_classify_parser, add_finetune_parser
from gptlab.finetune.data import Example, Fields, load_examples, read_rows, split_dev
from gptlab.finetune.predict import predict
from gptlab.finetune.tasks import TASK_TOKENS, TaskIds, add_task_tokens, encode_examples, fit_lengths, transform
from gptlab.finetune.train import FINETUNE_RECIPE, RECIPE, WARMUP_FRACTION, FinetuneLoss, collate, finetune, task_scores
from gptlab.stage import EpochOrder, resolve_train, schedule
from gptlab.model import GPT, preset
from gptlab.run import load_run, read_run_config, write_run_config
from gptlab.tokenizer import CharTokenizer
from gptlab.run.format import MODEL_FILE, save_model
from gptlab.train.optim import lr_at

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # ' ' = 0, a = 1, ..., z = 26, <|endoftext|> = 27
S, D, E = 28, 29, 30  # <|start|>, <|delim|>, <|extract|> appended after it
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=48)
FAST = dict(dtype="float32", peak_flops=1e12, log_interval=1, eval_interval=0, eval_iters=2)


def _ids(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def _tok():
    return add_task_tokens(CharTokenizer(ALPHABET))[0]


def _model(head: str, head_out: int, vocab: int = 31, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=vocab, head=head, head_out=head_out, **{**TINY, **kw}))


# --- input transformations -------------------------------------------------------------------------
def test_task_tokens_are_appended_and_cannot_be_injected_by_text():
    tok, new = add_task_tokens(CharTokenizer(ALPHABET + "<|>"))
    base = CharTokenizer(ALPHABET + "<|>").vocab_size
    assert [tok.special_tokens[t] for t in TASK_TOKENS] == new == [base, base + 1, base + 2]
    assert add_task_tokens(tok)[1] == []  # already there: nothing new, ids unchanged
    assert new[0] not in tok.encode("a<|start|>b") and len(tok.encode("<|start|>")) == len("<|start|>")


def test_each_transformation_gives_the_hand_built_ids():
    tok, ids = _tok(), TaskIds.of(_tok())
    assert (ids.start, ids.delim, ids.extract) == (S, D, E)
    cls = encode_examples("classification", [Example("hi ab")], tok, 48)
    assert cls == [[[S, 8, 9, 0, 1, 2, E]]]
    ent = encode_examples("entailment", [Example("ab", "c")], tok, 48)
    assert ent == [[[S, 1, 2, D, 3, E]]]
    sim = encode_examples("similarity", [Example("ab", "c")], tok, 48)
    assert sim == [[[S, 1, 2, D, 3, E], [S, 3, D, 1, 2, E]]]  # both orderings
    mc = encode_examples("multiple_choice", [Example("ab", choices=("x", "yz", "c"))], tok, 48)
    assert mc == [[[S, 1, 2, D, 24, E], [S, 1, 2, D, 25, 26, E], [S, 1, 2, D, 3, E]]]


def test_truncation_keeps_the_special_tokens():
    ids = TaskIds(S, D, E)
    assert transform("classification", [_ids("abcdefgh")], ids, 6) == [[S, 1, 2, 3, 4, E]]  # text keeps its start
    assert fit_lengths([10, 3], 8) == [5, 3] and fit_lengths([6, 6], 8) == [4, 4] and fit_lengths([2, 3], 8) == [2, 3]
    # pairs: the longest part is cut first
    assert transform("entailment", [_ids("abcdefgh"), _ids("xyz")], ids, 9) == [[S, 1, 2, 3, D, 24, 25, 26, E]]
    sim = transform("similarity", [_ids("abcdefgh"), _ids("xy")], ids, 8)
    assert sim == [[S, 1, 2, 3, D, 24, 25, E], [S, 24, 25, D, 1, 2, 3, E]]
    # multiple choice: the context keeps its END (next to the answer)
    mc = transform("multiple_choice", [_ids("abcdefgh"), _ids("x"), _ids("yz")], ids, 7)
    assert mc == [[S, 6, 7, 8, D, 24, E], [S, 7, 8, D, 25, 26, E]]
    assert all(len(s) <= 7 for s in mc)


def test_new_embedding_rows_are_drawn_like_the_rest_and_old_rows_kept():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=28, **TINY))
    old = model.wte.weight.detach().clone()
    tok, new = add_task_tokens(CharTokenizer(ALPHABET), model)
    assert model.cfg.vocab_size == tok.vocab_size == 31 and new == [S, D, E]
    assert torch.equal(model.wte.weight[:28], old) and model.lm_head.weight is model.wte.weight
    rows = model.wte.weight[28:].detach()
    assert rows.abs().min() > 0 and 0.005 < rows.std().item() < 0.06  # N(0, 0.02), not zeros or copies
    # a vocabulary padded beyond the tokenizer: the new ids land in existing rows, which are redrawn
    torch.manual_seed(0)
    padded = GPT(preset("tiny", vocab_size=40, **TINY))
    before = padded.wte.weight.detach().clone()
    add_task_tokens(CharTokenizer(ALPHABET), padded)
    assert padded.cfg.vocab_size == 40 and torch.equal(padded.wte.weight[:28], before[:28])
    assert not torch.equal(padded.wte.weight[28:31], before[28:31]) and torch.equal(padded.wte.weight[31:], before[31:])


# --- heads ---------------------------------------------------------------------------------------
def test_head_is_part_of_the_model_config_and_counted():
    cfg = preset("tiny", head="classifier", head_out=3, **TINY)
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params() == preset("tiny", **TINY).num_params() + 32 * 3 + 3
    assert torch.equal(model.head[1].bias, torch.zeros(3)) and model.head[0].p == 0.1
    with pytest.raises(GptlabError, match="head_out"):
        preset("tiny", head="classifier", head_out=1)
    with pytest.raises(GptlabError, match="head must be"):
        preset("tiny", head="regression")
    assert preset("tiny", head="scalar").head_out == 1
    with pytest.raises(GptlabError, match="no task head"):
        GPT(preset("tiny", **TINY)).head_logits(torch.zeros(1, 32))


def test_similarity_adds_both_orderings_before_the_head():
    model = _model("classifier", 2).eval()
    seqs = encode_examples("similarity", [Example("abc", "xy"), Example("hello", "b")], _tok(), 48)
    b = collate(seqs, [0, 1], 27)
    seen = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    logits = task_scores(model, model.hidden(b.x), b.extract, b.counts, "similarity")
    h = model.hidden(b.x)
    # by hand: sequence 2i is "a|b", 2i+1 is "b|a"; extract is each one's last real token
    h0 = h[0, len(seqs[0][0]) - 1] + h[1, len(seqs[0][1]) - 1]
    h1 = h[2, len(seqs[1][0]) - 1] + h[3, len(seqs[1][1]) - 1]
    torch.testing.assert_close(seen[0], torch.stack([h0, h1]))
    torch.testing.assert_close(logits, torch.stack([h0, h1]) @ model.head[1].weight.T + model.head[1].bias)


def test_multiple_choice_softmax_over_choices():
    model = _model("scalar", 1).eval()
    exs = [Example("ab", choices=("x", "yz", "c")), Example("cab", choices=("zz", "a"))]
    seqs = encode_examples("multiple_choice", exs, _tok(), 48)
    b = collate(seqs, [2, 0], 27)
    assert b.x.shape[0] == 5 and b.counts.tolist() == [3, 2]
    h = model.hidden(b.x)
    scores = task_scores(model, h, b.extract, b.counts, "multiple_choice")
    by_hand = [model.head_logits(h[i, len(s) - 1]).item() for i, s in enumerate(s for ex in seqs for s in ex)]
    assert scores.shape == (2, 3) and scores[1, 2].item() == float("-inf")  # example 2 has two choices
    torch.testing.assert_close(scores[0], torch.tensor(by_hand[:3]))
    torch.testing.assert_close(scores[1, :2], torch.tensor(by_hand[3:]))
    loss = FinetuneLoss(model, "multiple_choice", 0.0)
    task_loss = loss.terms(model, b)[1]
    p0, p1 = torch.softmax(torch.tensor(by_hand[:3]), 0), torch.softmax(torch.tensor(by_hand[3:]), 0)
    torch.testing.assert_close(task_loss, -(p0[2].log() + p1[0].log()) / 2)
    loss.close()


@pytest.mark.parametrize("lm_coef", [0.5, 0.0])
def test_l3_is_task_loss_plus_lambda_lm_loss(lm_coef):
    model = _model("classifier", 3).eval()
    seqs = encode_examples("entailment", [Example("abc", "d"), Example("x", "yyy zz"), Example("q", "r")], _tok(), 48)
    b = collate(seqs, [2, 0, 1], 27)
    assert b.targets[0].tolist()[:6] == [1, 2, 3, D, 4, E] and set(b.targets[0, 6:].tolist()) == {-100}
    loss = FinetuneLoss(model, "entailment", lm_coef)
    total, l2, l1, _ = loss.terms(model, b)
    # separately: the head on the trunk's extract states, and the model's own LM loss with -100 on pads
    h = model.hidden(b.x)
    l2_sep = F.cross_entropy(model.head_logits(h[torch.arange(3), b.extract]), b.labels)
    l1_sep = model(b.x, b.targets)[1]
    assert torch.equal(l2, l2_sep) and torch.equal(l1, l1_sep)
    assert torch.equal(total, l2_sep + lm_coef * l1_sep)
    if lm_coef == 0:
        assert torch.equal(total, l2_sep)  # the task loss only
    # gradients flow into the head and the trunk from one forward
    model.train()
    loss(model, b).backward()
    assert model.head[1].weight.grad.abs().sum() > 0 and model.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    loss.close()


# --- schedule and batches --------------------------------------------------------------------------
def test_gpt1_finetune_recipe_and_schedule():
    cfg, given = resolve_train(RECIPE, FINETUNE_RECIPE, {})
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.schedule, cfg.min_lr_ratio, cfg.weight_decay) == \
        ("gpt1-finetune", 6.25e-5, 32, "linear", 0.0, 0.01) and given == set()
    cfg = schedule(cfg, given, n_train=60614, epochs=3, warmup_fraction=WARMUP_FRACTION)
    assert cfg.max_iters == 5683 and cfg.warmup_iters == 12  # ceil(3·60614/32), ceil(0.2% of it)
    assert lr_at(cfg, 11, 0) == pytest.approx(6.25e-5 * 12 / 13) and lr_at(cfg, 12, 0) == pytest.approx(6.25e-5)
    assert lr_at(cfg, 5683, 0) == 0.0
    assert FINETUNE_RECIPE["grad_clip"] == 1.0
    cfg2, given2 = resolve_train(RECIPE, FINETUNE_RECIPE, {"max_iters": 10, "lr": "1e-4"})
    assert schedule(cfg2, given2, 60614, 3, WARMUP_FRACTION).max_iters == 10 and cfg2.lr == 1e-4


def test_epoch_order_is_a_permutation_per_epoch_and_independent_of_slicing():
    order = EpochOrder(10, seed=3)
    whole = [order.indices(s, slice(0, 4), 4) for s in range(5)]
    flat = [i for b in whole for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    assert EpochOrder(10, 3).indices(3, slice(2, 4), 4) == whole[3][2:]  # any rank, any resume: same samples


# --- data --------------------------------------------------------------------------------------------
def test_sst2_real_file_header_split_short_finetune_and_classify(shared_data, tmp_path, capsys):
    path = shared_data / "sst2" / "train.tsv"
    rows = read_rows(path)
    assert list(rows[0])[:2] == ["label", "sentence"]  # the header line names the columns
    examples, fields = load_examples(path, "classification")
    assert (fields.text, fields.label) == ("sentence", "label")
    assert len(examples) == 67349
    assert examples[0] == Example("hide new secretions from the parental units", label="0")  # CRLF stripped
    assert sum(e.label == "1" for e in examples) == 37569
    train, dev = split_dev(examples, 0.1, seed=1337)
    assert (len(train), len(dev)) == (60614, 6735) and not set(map(id, train)) & set(map(id, dev))
    assert split_dev(examples, 0.1, seed=1337)[1] == dev

    out = tmp_path / "sst2"
    res = finetune(out, path, init="random", preset_name="tiny", tokenizer="char", dev_fraction=0.01,
                   model_overrides=TINY, train_layers=({**FAST, "max_iters": 3, "batch_size": 8},), quiet=True)
    assert res["step"] == 3 and 0.0 <= res["val_acc"] <= 1.0
    cfg = read_run_config(out)
    assert cfg["stage"] == "finetune" and cfg["task"]["labels"] == ["0", "1"] and cfg["task"]["lm_coef"] == 0.5
    assert (cfg["task"]["n_train"], cfg["task"]["n_dev"]) == (66676, 673)  # round(1% of 67,349)
    run = load_run(out)
    assert run.model.cfg.head == "classifier" and all(t in run.tokenizer.special_tokens for t in TASK_TOKENS)
    preds = predict(run, ["a gorgeous , witty film", "dull and lifeless"])
    assert [p.label in ("0", "1") for p in preds] == [True, True]
    assert all(abs(sum(p.probs.values()) - 1) < 1e-5 and p.prob == max(p.probs.values()) for p in preds)
    # gptlab classify (parser as wired into gptlab/cli.py)
    capsys.readouterr()
    _cli(["classify", str(out), "--text", "a gorgeous , witty film", "--text", "dull and lifeless", "--json",
          "--dtype", "float32"])  # the library computed in fp32
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [ln["label"] for ln in lines] == [p.label for p in preds]
    assert [ln["prob"] for ln in lines] == pytest.approx([p.prob for p in preds], abs=1e-6)


def _cli(argv):
    p = argparse.ArgumentParser(prog="gptlab")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_finetune_parser(sub)
    add_classify_parser(sub)
    a = p.parse_args(argv)
    a.func(a)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["good", "great", "fine", "bad", "awful", "dull", "the", "film", "plot"]
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        rows.append({"review": text, "stars": "pos" if ("good" in text or "great" in text) else "neg"})
    return rows


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    data = _write_jsonl(tmp_path / "toy.jsonl", _toy_rows(60))
    kw = dict(init="random", preset_name="tiny", tokenizer="char", fields=Fields(text="review", label="stars"),
              model_overrides={**TINY, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.1}, quiet=True)
    layer = {**FAST, "batch_size": 8, "warmup_iters": 2, "decay_iters": 10, "checkpoint_interval": 100, "lr": 1e-3}
    finetune(tmp_path / "straight", data, train_layers=({**layer, "max_iters": 10},), **kw)
    finetune(tmp_path / "split", data, train_layers=({**layer, "max_iters": 5},), **kw)  # 60 × 0.9 / 8: crosses an epoch
    finetune(tmp_path / "split", train_layers=({"max_iters": 10},), resume=True, quiet=True)

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 11)) and straight == split  # exact, dropout included
    a, b = load_run(tmp_path / "straight").model.state_dict(), load_run(tmp_path / "split").model.state_dict()
    assert a.keys() == b.keys() and "head.1.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    cfg = read_run_config(tmp_path / "split")
    assert cfg["task"]["labels"] == ["neg", "pos"] and cfg["task"]["fields"]["text"] == "review"


@pytest.fixture
def pretrained(tmp_path) -> Path:
    """A stand-in pretrained run dir: a tiny char-level GPT saved as `gptlab pretrain` saves one."""
    torch.manual_seed(1)
    tok = CharTokenizer(ALPHABET + ".")
    cfg = preset("tiny", vocab_size=tok.vocab_size, **TINY)
    d = tmp_path / "pre"
    write_run_config(d, cfg, tok, stage="pretrain")
    save_model(GPT(cfg), d / MODEL_FILE)
    return d


def test_finetune_from_a_pretrained_run_through_the_cli(pretrained, tmp_path, capsys):
    rng = random.Random(0)
    rows = [{"premise": " ".join(rng.choice(["a cat", "the dog", "a bird"]) for _ in range(2)),
             "hypothesis": rng.choice(["an animal.", "a car.", "no thing."]), "label": rng.choice(["yes", "no", "maybe"])}
            for _ in range(40)]
    (tmp_path / "nli.tsv").write_text("premise\thypothesis\tlabel\n" + "".join(
        f"{r['premise']}\t{r['hypothesis']}\t{r['label']}\n" for r in rows))
    out = tmp_path / "ft"
    _cli(["finetune", "--from", str(pretrained), "--data", str(tmp_path / "nli.tsv"), "--task", "entailment",
          "--out", str(out), "--lm-coef", "0.25", "--model.head_pdrop", "0.2", "--train.max_iters", "2",
          "--train.batch_size", "4", "--train.dtype", "float32", "--train.peak_flops", "1e12", "--train.eval_iters", "1"])
    run = load_run(out)
    pre = load_run(pretrained)
    assert run.model.cfg.vocab_size == pre.model.cfg.vocab_size + 3 and run.model.cfg.head_out == 3
    assert run.model.cfg.head_pdrop == 0.2 and run.config["task"]["lm_coef"] == 0.25
    assert run.config["task"]["labels"] == ["maybe", "no", "yes"] and run.config["init"]["from"] == str(pretrained.resolve())
    assert run.model.lm_head.weight.shape[0] == run.tokenizer.vocab_size
    with torch.no_grad():  # the LM head still works: generate/chat load this run dir as any other
        logits, _ = run.model(torch.tensor([run.tokenizer.encode("a cat")]))
    assert logits.shape == (1, 5, run.tokenizer.vocab_size)
    capsys.readouterr()
    _cli(["classify", str(out), "--file", str(tmp_path / "nli.tsv")])
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 40 and all(ln.split("\t")[0] in ("yes", "no", "maybe")
                                                        for ln in captured.out.splitlines())
    assert captured.err.splitlines()[-1].startswith("accuracy ")
    with pytest.raises(GptlabError, match="pairs"):
        _cli(["classify", str(out), "--text", "a cat"])
    # --from RUN --init random: that run's architecture and tokenizer, fresh weights (the ablation baseline)
    rnd = tmp_path / "rnd"
    _cli(["finetune", "--from", str(pretrained), "--init", "random", "--data", str(tmp_path / "nli.tsv"), "--task",
          "entailment", "--out", str(rnd), "--train.max_iters", "0", "--train.peak_flops", "1e12"])
    r = load_run(rnd)
    assert r.model.cfg.to_dict() == {**run.model.cfg.to_dict(), "head_pdrop": 0.1} and r.tokenizer.to_dict() == run.tokenizer.to_dict()
    assert r.config["init"] == {"from": str(pretrained.resolve()), "weights": "random"}
    assert not torch.equal(r.model.wte.weight[:28], pre.model.wte.weight[:28])
    with pytest.raises(GptlabError, match="cannot change when fine-tuning a pretrained run"):
        finetune(tmp_path / "x", tmp_path / "nli.tsv", task="entailment", init_from=pretrained,
                 model_overrides={"n_layer": 3}, quiet=True)
    # --transfer-layers 1: the embeddings and block 0 are the pretrained ones, the blocks above are new
    part = tmp_path / "part"
    _cli(["finetune", "--from", str(pretrained), "--transfer-layers", "1", "--data", str(tmp_path / "nli.tsv"),
          "--task", "entailment", "--out", str(part), "--train.max_iters", "0", "--train.peak_flops", "1e12"])
    p = load_run(part)
    assert p.config["init"]["transfer_layers"] == 1 and pre.model.cfg.n_layer >= 2
    assert torch.equal(p.model.wte.weight[:28], pre.model.wte.weight[:28]) and torch.equal(p.model.wpe.weight, pre.model.wpe.weight)
    assert all(torch.equal(a, b) for a, b in zip(p.model.h[0].state_dict().values(), pre.model.h[0].state_dict().values()))
    assert not torch.equal(p.model.h[1].attn.c_attn.weight, pre.model.h[1].attn.c_attn.weight)


def test_multiple_choice_from_csv_columns_end_to_end(pretrained, tmp_path):
    rng = random.Random(2)
    lines = ["story,ending0,ending1,answer"]
    for _ in range(24):
        right = rng.randrange(2)
        ends = ["a happy end.", "a sad end."] if right == 0 else ["a sad end.", "a happy end."]
        lines.append(f"the cat ate,{ends[0]},{ends[1]},{right}")
    (tmp_path / "mc.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "mc"
    finetune(out, tmp_path / "mc.csv", task="multiple_choice", init_from=pretrained, quiet=True,
             fields=Fields(context="story", choices="ending0,ending1", label="answer"),
             train_layers=({**FAST, "max_iters": 2, "batch_size": 4},))
    run = load_run(out)
    assert (run.model.cfg.head, run.model.cfg.head_out, run.config["task"]["labels"]) == ("scalar", 1, None)
    preds = predict(run, [("the dog ran", ["far away.", "home.", "to the park."])])  # any number of choices
    assert preds[0].choice == ["far away.", "home.", "to the park."][int(preds[0].label)]
    assert sorted(preds[0].probs) == ["0", "1", "2"] and abs(sum(preds[0].probs.values()) - 1) < 1e-5


# --- bad input -----------------------------------------------------------------------------------
def _one_line_error(match: str, fn, *args, **kw):
    with pytest.raises(GptlabError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path, pretrained):
    tsv = tmp_path / "d.tsv"
    _one_line_error("data file not found", load_examples, tmp_path / "missing.tsv", "classification")
    _one_line_error("unknown data format", load_examples, tmp_path / "d.txt", "classification")
    tsv.write_text("label\tsentence\n")
    _one_line_error("no examples", load_examples, tsv, "classification")
    tsv.write_bytes(b"label\tsentence\n1\tfine\n0\tcaf\xe9 au lait\n")
    _one_line_error("invalid UTF-8 at line 3", load_examples, tsv, "classification")
    tsv.write_text("stars\treview\n1\tfine\n")
    _one_line_error("no text field.*--text-field", load_examples, tsv, "classification")
    _one_line_error("no field 'body' for --text-field", load_examples, tsv, "classification", Fields(text="body"))
    tsv.write_text("label\tsentence\n1\tfine\n0\ttoo\tmany\n")
    _one_line_error("line 3 has 3 fields", load_examples, tsv, "classification")
    _one_line_error("unknown task type 'regression'", load_examples, tsv, "regression")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    _one_line_error("line 2 is not valid JSON", load_examples, jl, "classification")
    jl.write_text('{"context": "a", "choices": ["x", "y"], "label": 5}\n')
    _one_line_error("label '5' is neither a choice index", finetune, tmp_path / "o", jl, task="multiple_choice",
                    init_from=pretrained, dev_fraction=0.0, quiet=True)
    jl.write_text('{"context": "a", "choices": "x", "label": 0}\n')
    _one_line_error("must be a list of choices", load_examples, jl, "multiple_choice")
    good = _write_jsonl(tmp_path / "g.jsonl", _toy_rows(20))
    fields = Fields(text="review", label="stars")
    _one_line_error("needs --from RUN_DIR", finetune, tmp_path / "o", good, fields=fields, quiet=True)
    _one_line_error("needs --preset", finetune, tmp_path / "o", good, init="random", fields=fields, quiet=True)
    _one_line_error("--preset goes with --init random", finetune, tmp_path / "o", good, init_from=pretrained,
                    preset_name="tiny", fields=fields, quiet=True)
    _one_line_error(r"--transfer-layers must be in \[0, ", finetune, tmp_path / "o", good, init_from=pretrained,
                    fields=fields, transfer_layers=99, quiet=True)
    _one_line_error("--transfer-layers chooses", finetune, tmp_path / "o", good, init_from=pretrained, init="random",
                    fields=fields, transfer_layers=1, quiet=True)
    _one_line_error("--lm-coef must be", finetune, tmp_path / "o", good, init_from=pretrained, fields=fields,
                    lm_coef=-1.0, quiet=True)
    _one_line_error("single label", finetune, tmp_path / "o", _write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 1}] * 5),
                    init_from=pretrained, quiet=True)
    _one_line_error("not a fine-tuned run", predict, load_run(pretrained), ["abc"])
    _one_line_error("run directory not found", finetune, tmp_path / "nothing", resume=True, quiet=True)


def test_numeric_labels_name_the_same_class_in_every_format():
    from gptlab.finetune.data import _label_str

    assert _label_str("1.0") == _label_str(1.0) == _label_str(1) == _label_str(" 1 ") == "1"
    assert _label_str("positive") == "positive" and _label_str("0.5") == "0.5"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_finetune_like_one(pretrained, tmp_path, mode):
    """The task head runs outside the trunk's forward: under DDP and FSDP2 its gradients must still be
    reduced, so 2 processes × batch 4 follow 1 process × batch 8."""
    import os
    import subprocess
    import sys

    data = _write_jsonl(tmp_path / "toy.jsonl", _toy_rows(80))
    common = ["finetune", "--from", str(pretrained), "--data", str(data), "--text-field", "review",
              "--label-field", "stars", "--train.max_iters", "6", "--train.dtype", "float32", "--train.lr", "3e-3",
              "--train.eval_iters", "1", "--train.log_interval", "1", "--train.checkpoint_interval", "100",
              "--model.head_pdrop", "0"]  # no dropout: 1 and 2 processes draw different masks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    one = run([sys.executable, "-m", "gptlab", *common, "--out", str(tmp_path / "one"), "--train.batch_size", "8"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptlab",
               *common, "--out", str(tmp_path / "two"), "--train.batch_size", "4", "--train.distributed", mode])
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and all(abs(x - y) < 1e-4 for x, y in zip(a, b))
    wa, wb = load_run(tmp_path / "one").model.state_dict(), load_run(tmp_path / "two").model.state_dict()
    assert torch.allclose(wa["head.1.weight"], wb["head.1.weight"], atol=1e-5)


def test_resume_refuses_a_new_dev_split_and_model_overrides(tmp_path):
    data = _write_jsonl(tmp_path / "toy.jsonl", _toy_rows(40))
    kw = dict(init="random", preset_name="tiny", tokenizer="char", fields=Fields(text="review", label="stars"),
              model_overrides=TINY, quiet=True)
    finetune(tmp_path / "r", data, train_layers=({**FAST, "batch_size": 8, "max_iters": 2},), **kw)
    other = _write_jsonl(tmp_path / "dev.jsonl", _toy_rows(10, seed=3))
    with pytest.raises(GptlabError, match="resume without --dev"):
        finetune(tmp_path / "r", dev=other, train_layers=({"max_iters": 4},), resume=True, quiet=True)
    with pytest.raises(GptlabError, match="cannot change a run being resumed"):
        finetune(tmp_path / "r", model_overrides={"head_pdrop": 0.3}, train_layers=({"max_iters": 4},), resume=True,
                 quiet=True)
    finetune(tmp_path / "r", train_layers=({"max_iters": 4},), resume=True, quiet=True)  # plain resume still works


def test_real_valued_similarity_scores_are_refused(tmp_path):
    rows = [{"text": f"a {i}", "text2": f"b {i}", "label": str(i % 5 + 0.5)} for i in range(20)]
    data = _write_jsonl(tmp_path / "sts.jsonl", rows)
    with pytest.raises(GptlabError, match="real-valued scores"):
        finetune(tmp_path / "s", data, task="similarity", init="random", preset_name="tiny", tokenizer="char",
                 model_overrides=TINY, train_layers=({**FAST, "max_iters": 1},), quiet=True)
