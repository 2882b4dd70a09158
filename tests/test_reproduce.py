"""`gptlab reproduce`: the sparsegpt recipe end to end at its smoke scale (report.md, results.json, the figure),
its dense perplexity against an independent evaluation, each verdict against its own numbers, bad names."""

import json

import pytest

from gptlab.cli import main as cli
from gptlab.compress.report import val_perplexity
from gptlab.reproduce.cli import reproduce
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
    assert "choose from sparsegpt" in capsys.readouterr().err
    assert cli(["reproduce", "sparsegpt", "--scale", "tpu", "--out", str(tmp_path / "y")]) == 2
    assert "--scale is one of cpu, gpu, smoke" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
