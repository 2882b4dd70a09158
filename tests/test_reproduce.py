"""`gptlab reproduce`: the sparsegpt and gpt1 recipes end to end at their smoke scale (report.md, results.json,
the figures), their numbers against an independent evaluation, each verdict against its own numbers, the
SST-2 splits against a naive check of their overlap, bad names."""

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
    assert "choose from gpt1, gpt2, sparsegpt" in capsys.readouterr().err
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
