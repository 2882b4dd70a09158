"""`gptlab reproduce`: the recipes end to end at their smoke scale (report.md, results.json, the figures), their
numbers against an independent evaluation, each verdict against its own numbers, the SST-2 splits against a
naive check of their overlap, GPT-3's synthetic tasks against naive checks, bad names."""

import json
import math

import pytest

from gptlab.cli import main as cli
from gptlab.errors import GptlabError
from gptlab.finetune import predict
from gptlab.compress.report import val_perplexity
from gptlab.reproduce.cli import reproduce
from gptlab.reproduce.sst2 import make_splits, read_sst2, write_tsv
from gptlab.run import load_run


def test_sparsegpt_recipe_reports_claims_that_follow_from_its_numbers(tmp_path):
    out = tmp_path / "sg"
    report = reproduce("sparsegpt", out, "smoke", quiet=True)
    r = json.loads((out / "results.json").read_text())
    dense = val_perplexity(load_run(out / "model").model, out / "data", 4096)["val_ppl"]
    assert r["dense_ppl"] == pytest.approx(dense, rel=1e-6)
    mag, sg = r["magnitude"], r["sparsegpt"]
    assert len(mag) == len(sg) == 8 and mag["0.8"] > r["dense_ppl"]  # pruning 80% of a model costs something
    holds = [c["holds"] for c in r["claims"]]
    assert holds[1] == all(sg[k] < mag[k] for k in ("0.5", "0.6", "0.7", "0.8"))
    assert holds[2] == (r["semi_structured"]["sparsegpt 2:4"] < r["semi_structured"]["magnitude 2:4"])
    assert holds[3] == (r["quantized"]["gptq 4-bit"] < r["quantized"]["rtn 4-bit"])
    text = report.read_text()
    assert "| the paper says | paper | we measured | holds at this scale? |" in text and text.count("\n| ") >= 4 + 9
    reproduce("sparsegpt", out, "smoke", quiet=True)  # again: the model is reused, not retrained
    assert len(list((out / "model" / "checkpoints").iterdir())) >= 1


def test_unknown_reproduction_and_scale_are_one_line_errors(tmp_path, capsys):
    assert cli(["reproduce", "gpt5", "--out", str(tmp_path / "x")]) == 2
    assert "choose from gpt1, gpt2, gpt3, gpt4o, instructgpt, sparsegpt" in capsys.readouterr().err
    assert cli(["reproduce", "sparsegpt", "--scale", "tpu", "--out", str(tmp_path / "y")]) == 2
    assert "--scale is one of cpu, gpu, smoke" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert cli(["reproduce", "sparsegpt", "--data", "x.tsv", "--out", str(tmp_path / "z")]) == 2
    assert "reads no dataset file" in capsys.readouterr().err
    other = tmp_path / "other"  # models of other settings are never silently reused
    other.mkdir()
    (other / "recipe.json").write_text(json.dumps({"name": "sparsegpt", "scale": "cpu"}))
    assert cli(["reproduce", "sparsegpt", "--scale", "smoke", "--out", str(other)]) == 2
    assert "holds the models of other settings" in capsys.readouterr().err
    assert json.loads((other / "recipe.json").read_text()) == {"name": "sparsegpt", "scale": "cpu"}


def test_sst2_splits_hold_out_whole_sentences_and_measure_the_overlap(shared_data, tmp_path):
    rows = read_sst2(shared_data / "sst2" / "train.tsv")
    sp = make_splits(rows, 300, 40, seed=1)
    train = [t for _, t in sp.train]
    assert not {t for _, t in sp.heldout + sp.unseen} & set(train)
    for _, sentence in sp.unseen:  # naive: no training phrase of ≥ 3 words occurs inside a held-out sentence
        padded = f" {sentence} "
        assert len(sentence.split()) >= 15
        assert not any(len(t.split()) >= 3 and f" {t} " in padded for t in train)
    inside = sum(any(f" {h} " in f" {t} " for t in train) for _, h in sp.heldout) / len(sp.heldout)
    assert sp.inside == pytest.approx(inside) and 0.5 < inside < 1  # most random phrases are parts of others
    (tmp_path / "bad.tsv").write_text("label\tsentence\n1\tfine\n2\tnot a label\n")
    with pytest.raises(GptlabError, match=r"bad.tsv:3: expected label<TAB>sentence"):
        read_sst2(tmp_path / "bad.tsv")
    assert read_sst2(write_tsv(tmp_path / "w.tsv", sp.unseen)) == sp.unseen


def test_gpt1_recipe_reports_claims_that_follow_from_its_numbers(shared_data, tmp_path):
    out = tmp_path / "g1"
    report = reproduce("gpt1", out, "smoke", quiet=True, data=shared_data / "sst2" / "train.tsv")
    r = json.loads((out / "results.json").read_text())
    pre, rand = r["arms"]["pretrained, λ 0.5"], r["arms"]["random init, λ 0.5"]
    assert set(pre) == {"40", "120"} and len(pre["40"]["runs"]) == 2 and len(pre["120"]["runs"]) == 1
    # the recorded held-out accuracy is the fine-tuned run's own predictions, counted again here
    heldout = [(int(y), t) for y, t in (ln.split("\t", 1) for ln in (out / "heldout.tsv").read_text().splitlines()[1:])]
    preds = predict(load_run(out / "finetune" / "pre-120"), [t for _, t in heldout])
    assert pre["120"]["heldout"] == pytest.approx(sum(p.label == str(y) for p, (y, _) in zip(preds, heldout)) / len(heldout))
    gain = pre["40"]["heldout"] - rand["40"]["heldout"]
    assert r["claims"][0]["holds"] == (gain >= 0.05)
    assert set(r["transfer"]) == {"0", "1", "2"} and r["transfer"]["2"] == pre["40"]["runs"][0]
    assert [z["step"] for z in r["zero_shot"]] == [12, 24] and all(0 <= z["raw"] <= 1 for z in r["zero_shot"])
    text = report.read_text()
    assert "| labels | majority | TF-IDF + LR |" in text and "accuracy_vs_labels.png" in text
    assert (out / "accuracy_vs_labels.png").is_file() == (out / "layers_transferred.png").is_file()
    before = (out / "finetune" / "pre-120" / "accuracy.json").stat().st_mtime
    reproduce("gpt1", out, "smoke", quiet=True, data=shared_data / "sst2" / "train.tsv")  # cached: nothing retrained
    assert (out / "finetune" / "pre-120" / "accuracy.json").stat().st_mtime == before


def test_gpt2_recipe_fits_its_power_law_and_scores_each_size(shared_data, tmp_path):
    out = tmp_path / "g2"
    report = reproduce("gpt2", out, "smoke", quiet=True)
    r = json.loads((out / "results.json").read_text())
    sizes = r["sizes"]
    assert list(sizes) == ["1 × 32", "2 × 48"]
    small = load_run(out / "model-1x32").model
    # non-embedding parameters, counted by hand: per block 12·d² + 13·d, plus the final LayerNorm
    assert sizes["1 × 32"]["params"] == 12 * 32 ** 2 + 13 * 32 + 2 * 32 == \
        sum(p.numel() for n, p in small.named_parameters() if not n.startswith(("wte", "wpe")))
    # the fit against an independent least squares on the two points: exact through both
    (n0, l0), (n1, l1) = [(z["params"], z["val_loss"]) for z in sizes.values()]
    alpha = -(math.log(l1) - math.log(l0)) / (math.log(n1) - math.log(n0))
    assert r["fit"]["alpha"] == pytest.approx(alpha) and r["fit"]["r2"] == pytest.approx(1.0)
    passages = [json.loads(ln)["text"] for ln in (out / "last_word.jsonl").read_text().splitlines()]
    assert len(passages) == r["passages"] > 0 and all(len(p.split()) == 60 and p.split()[-1].isalpha() for p in passages)
    assert all(0 <= z["last_word_acc"] <= 1 and 0 <= z["sst2_acc"] <= 1 for z in sizes.values())
    assert r["claims"][0]["holds"] == (sizes["2 × 48"]["val_loss"] < sizes["1 × 32"]["val_loss"])
    assert "loss_vs_params.png" in report.read_text()


def test_gpt3_synthetic_tasks_are_what_they_say_and_hold_out_their_words():
    import random

    from gptlab.reproduce import gpt3_tasks as t

    text = " ".join(["alpha beta gamma delta epsilon zephyr quartz mango lemon cherry"] * 50) + \
        " pineapple raspberry strawberry"  # strawberry: 10 letters, too long
    rnd = random.Random(0)
    for w in ("strawberry", "mango", "abcd"):
        sym = t.scramble("symbols", w, rnd)
        assert sym[::2] == w and all(c in " .,;:!?-'/" for c in sym[1::2])
        cyc = t.scramble("cycle", w, rnd)
        assert cyc != w and cyc in w + w
        ana = t.scramble("anagram", w, rnd)
        assert ana[0] == w[0] and ana[-1] == w[-1] and sorted(ana) == sorted(w)
        assert t.scramble("reverse", w, rnd) == w[::-1]
    assert t.line("add2", "48 76", rnd) == "48 plus 76 = 124"
    v = t.split_vocab(text, 12)
    assert set(v.train["symbols"]) | set(v.heldout["symbols"]) == {"alpha", "beta", "gamma", "delta", "epsilon",
                                                                   "zephyr", "quartz", "mango", "lemon", "cherry",
                                                                   "pineapple", "raspberry"}
    assert not set(v.train["add2"]) & set(v.heldout["add2"]) and len(v.train["add2"]) + len(v.heldout["add2"]) == 8100
    held = set(v.heldout["symbols"]) | {str(int(a) + int(b)) for a, b in map(str.split, v.heldout["add2"])}
    for ep in t.episodes(v, 20_000, 4):  # no held-out word is ever an answer in pretraining
        lines = ep.strip().split("\n")
        assert 1 <= len(lines) <= 5 and not {ln.rsplit(" = ", 1)[1] for ln in lines} & set(v.heldout["symbols"])
    test, demos = t.eval_rows(v, "reverse", 1)
    assert len(test) == 1 and len(demos) == len(v.heldout["reverse"]) - 1
    assert {r["output"] for r in test + demos} == set(v.heldout["reverse"]) and held


def test_gpt3_recipe_measures_each_size_and_k_and_both_attentions(tmp_path):
    from gptlab.reproduce.gpt3 import SHOTS
    from gptlab.reproduce.gpt3_report import _mean_acc
    from gptlab.reproduce.steps import last_metric

    out = tmp_path / "g3"
    report = reproduce("gpt3", out, "smoke", quiet=True)
    r = json.loads((out / "results.json").read_text())
    assert list(r["sizes"]) == ["1 × 32", "2 × 32"]
    for res in r["sizes"].values():
        for task in ("symbols", "cycle", "anagram", "reverse", "add2"):
            assert [int(k) for k in res[task]] == list(SHOTS) and all(0 <= x["acc"] <= 1 for x in res[task].values())
            assert res[task]["0"]["shots"] == 0 and 0 < res[task]["4"]["shots"] <= 4  # fewer where K would overflow
    few = [_mean_acc(res, 16) for res in r["sizes"].values()]
    assert r["claims"][1]["holds"] == ((few[1] - _mean_acc(r["sizes"]["2 × 32"], 0)) >
                                       (few[0] - _mean_acc(r["sizes"]["1 × 32"], 0)))
    att = r["attention"]
    assert att["dense"]["val_loss"] == last_metric(out / "long-dense", "val_loss")
    cfg = json.loads((out / "long-alternating" / "config.json").read_text())["model"]
    assert cfg["attention"] == ["dense", "local"] and cfg["block_size"] == 256 and cfg["local_window"] == 32
    assert r["claims"][4]["holds"] == (att["alternating"]["val_loss"] - att["dense"]["val_loss"] <= 0.02 * att["dense"]["val_loss"])
    assert "in_context_vs_shots.png" in report.read_text()


def test_instructgpt_recipe_judges_policies_with_a_model_they_never_saw(shared_data, tmp_path):
    from gptlab.align.data import load_preferences
    from gptlab.align.reward import RewardModel

    out = tmp_path / "ig"
    report = reproduce("instructgpt", out, "smoke", quiet=True, data=shared_data / "preferences" / "hh_harmless_1800.jsonl")
    r = json.loads((out / "results.json").read_text())
    assert r["pairs"] == {"test": 40, "rm": 880, "judge": 880}
    tests = [json.loads(ln) for ln in (out / "pairs" / "test.jsonl").read_text().splitlines()]
    judge_rows = {ln for ln in (out / "pairs" / "judge.jsonl").read_text().splitlines()}
    assert not judge_rows & {ln for ln in (out / "pairs" / "rm.jsonl").read_text().splitlines()}
    # accuracy recounted: the judge's own scores of each test pair, chosen above rejected
    judge = RewardModel.load(out / "judge")
    prefs = load_preferences(out / "pairs" / "test.jsonl", quiet=True)
    wins = [a > b for a, b in (judge.score([p.prompt] * 2, p.responses) for p in prefs)]
    assert r["accuracy"]["judge (B)"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
    last = lambda d: d.rsplit("\n\nAssistant:", 1)[-1].strip()  # noqa: E731
    lengths = [(len(last(x["chosen"])), len(last(x["rejected"]))) for x in tests]
    shorter = sum(1.0 if c < j else 0.5 if c == j else 0.0 for c, j in lengths) / len(tests)
    assert r["accuracy"]["shorter reply wins"] == pytest.approx(shorter)
    assert r["curve"][0]["step"] == 0 and abs(r["curve"][0]["kl"]) < 1e-4  # the SFT model against itself
    assert [p["step"] for p in r["curve"]] == [0, 2, 4]
    assert set(r["policies"]) == {"pretrained", "SFT", "PPO", "PPO-ptx", "PPO round 2"}
    assert set(r["tax"]) == {"pretrained", "SFT", "PPO", "PPO-ptx"} and all(v > 1 for v in r["tax"].values())
    assert (out / "rlhf" / "round_2" / "comparisons.jsonl").is_file()  # round 2: the policy's samples, judged
    assert "Policies, judged" in report.read_text()


def test_gpt4o_recipe_states_its_claims_from_the_measured_report(tmp_path, monkeypatch):
    from gptlab.reproduce import gpt4o

    task = lambda acc, **kw: {"accuracy": acc, "n": 100, **kw}  # noqa: E731
    canned = {"image_to_text": task(0.96), "text_to_image": task(0.90), "speech_to_text": task(0.885),
              "text_to_speech": task(0.78, transcript_accuracy=0.94), "image_speech_to_speech": task(0.83, transcript_accuracy=0.96),
              "mixed": task(0.83), "text_to_image_grid": 0.95, "image_tokenizer_psnr_db": 42.8, "image_codes": 16,
              "audio_codes": 1024, "parameters": 2.04e6, "seconds": {"data": 180.0, "train": 850.0, "total": 1100.0},
              "latency_first_audio_chunk": {"n": 20, "p50_ms": 140.0, "p90_ms": 177.0},
              "ceilings": {"digit_judge_on_real_heldout_digits": 0.992, "speech_judge_on_real_speech:text_to_speech": 0.795,
                           "speech_judge_on_real_speech:image_speech_to_speech": 0.73}}
    monkeypatch.setattr(gpt4o, "measure", lambda out, s, quiet=False: canned)
    report = reproduce("gpt4o", tmp_path / "g4o", "smoke", quiet=True)
    claims = json.loads((tmp_path / "g4o" / "results.json").read_text())["claims"]
    assert [c["holds"] for c in claims] == [False, True, True, True]  # speech → text 88.5% < 90%
    assert claims[0]["why"].startswith("short of the target on speech_to_text (")
    text = report.read_text()
    assert "| speech → text, word accuracy | 88.5% | ≥ 90% |" in text and "p50 140 ms" in text
