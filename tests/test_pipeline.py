"""`gptlab pipeline`: every stage end to end on a tiny config, the stage cache, resume, failures."""

import json
import re
import shutil
from pathlib import Path

import pytest

from gptlab.errors import GptlabError
from gptlab.pipeline.config import load_pipeline_config, parse_set
from gptlab.pipeline.runner import resume_command, run_pipeline
from gptlab.pipeline.state import STATE_FILE
from gptlab.pipeline.synth import judge, make_datasets, parse_speeches, topic_of

TINY = """
corpus: {corpus}
tokenizer: {{spec: "bpe:300"}}
pretrain:
  preset: tiny
  model: {{block_size: 96}}
  train: {{max_iters: 12, batch_size: 8, block_size: 96, eval_interval: 6, eval_iters: 2, sample_interval: 0,
          log_interval: 4, checkpoint_interval: 6, dtype: float32}}
synth: {{n_sft: 48, n_pref: 24, n_prompts: 12, n_cloze: 12}}
evaluate: {{shots: [0, 1], cloze_n: 6, eval_tokens: 768}}
sft: {{epochs: 1, train: {{batch_size: 8, eval_interval: 3, dtype: float32}}}}
reward: {{epochs: 1, train: {{batch_size: 4, eval_interval: 3, dtype: float32}}}}
ppo: {{config: {{iterations: 2, rollout_prompts: 4, minibatch_size: 4, max_new_tokens: 12, eval_prompts: 4,
                dtype: float32}}}}
dpo: {{enabled: true, epochs: 1, train: {{batch_size: 4, dtype: float32}}}}
compress: {{calib_samples: 4, eval_tokens: 1024, decode_tokens: 8}}
samples: {{n: 3, max_new_tokens: 12}}
"""
ALL = ["tokenizer", "prepare", "pretrain", "synth", "evaluate", "sft", "reward", "ppo", "dpo", "compress",
       "evaluate_final", "samples"]


def finished(root: Path) -> dict[str, float]:
    stages = json.loads((root / STATE_FILE).read_text())["stages"]
    return {k: v["finished"] for k, v in stages.items() if v.get("status") == "done"}


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY.format(corpus=shared_data / "tinyshakespeare.txt"))
    root = d / "run"
    run_pipeline(load_pipeline_config(cfg, out=str(root)), quiet=True)
    return cfg, root


@pytest.mark.slow
def test_every_stage_runs_and_the_report_has_each_stages_figures(tiny):
    cfg, root = tiny
    assert sorted(finished(root)) == sorted(ALL)
    report = (root / "report" / "report.md").read_text()
    for heading in ("## Pretraining", "## Zero/few-shot evaluation", "## SFT", "## Reward model", "## PPO", "## DPO",
                    "## Compression", "## Evaluation of every model", "## Chat samples"):
        assert heading in report
    for png in ("pretrain_loss.png", "reward_accuracy.png", "ppo_reward.png", "ppo_kl.png", "ppl_vs_sparsity.png"):
        assert (root / "report" / png).stat().st_size > 1000
    results = json.loads((root / "report" / "results.json").read_text())
    assert 0.0 <= results["reward"]["heldout_accuracy"] <= 1.0
    assert isinstance(results["ppo"]["reward_after"], float) and isinstance(results["ppo"]["kl_after"], float)
    table = results["compress"]["table"]
    assert len(table) == 4  # dense PPO model, int8, SparseGPT 50%, magnitude 50%
    assert sorted(round(r["sparsity"], 2) for r in table if r["method"] != "int8") == [0.0, 0.5, 0.5]
    models = results["evaluate_final"]["models"]
    assert set(models) == {"pretrain", "sft", "ppo", "dpo", "ppo+int8", "ppo+sparsegpt-50", "ppo+magnitude-50"}
    for m in models.values():
        assert 1.0 < m["val_ppl"] < 1000 and set(m["cloze_acc"]) == {"0-shot", "1-shot"}
    # int8 weight-only is a small perturbation of the PPO model it came from
    assert abs(models["ppo+int8"]["val_loss"] - models["ppo"]["val_loss"]) < 0.02
    samples = results["samples"]
    assert len(samples["prompts"]) == 3 and all(len(v["replies"]) == 3 for v in samples["models"].values())
    # every chat model is a run dir `gptlab chat` loads
    assert all((root / d / "config.json").exists() for d in ("sft", "ppo", "dpo", "compress/int8"))


@pytest.mark.slow
def test_second_run_skips_every_stage_and_a_changed_stage_reruns_with_everything_after_it(tiny, capsys):
    cfg, root = tiny
    before = finished(root)
    run_pipeline(load_pipeline_config(cfg, out=str(root)))
    out = capsys.readouterr().out
    assert finished(root) == before
    assert out.count("cached (took") == len(ALL) and "running" not in out

    run_pipeline(load_pipeline_config(cfg, ["reward.train.lr=2e-4"], out=str(root)), quiet=True)
    after = finished(root)
    rerun = {k for k in ALL if after[k] != before[k]}
    # the reward model and what reads it (directly or downstream) re-ran; nothing upstream or beside it did
    assert rerun == {"reward", "ppo", "compress", "evaluate_final", "samples"}


@pytest.mark.slow
def test_interrupted_training_stage_resumes_from_its_checkpoint(tiny, capsys):
    cfg, root = tiny
    state = json.loads((root / STATE_FILE).read_text())
    state["stages"]["dpo"]["status"] = "running"  # as if the process died inside the stage
    (root / STATE_FILE).write_text(json.dumps(state))
    first_line = (root / "dpo" / "metrics.jsonl").read_text().splitlines()[0]
    run_pipeline(load_pipeline_config(cfg, out=str(root)), only="dpo")
    assert "resuming from its last checkpoint" in capsys.readouterr().out
    assert (root / "dpo" / "metrics.jsonl").read_text().splitlines()[0] == first_line  # not started over
    assert finished(root)["dpo"] > state["stages"]["dpo"]["finished"]


@pytest.mark.slow
def test_a_failing_stage_is_named_with_its_reason_and_the_resume_command(tiny, tmp_path):
    cfg, root = tiny
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n')
    with pytest.raises(GptlabError) as e:
        run_pipeline(load_pipeline_config(cfg, [f"ppo.prompts={bad}"], out=str(work)),
                     resume_cmd="gptlab pipeline --config x.yaml", quiet=True)
    msg = str(e.value)
    assert msg.startswith("pipeline stage 'ppo' failed:") and "resume with: gptlab pipeline --config x.yaml" in msg
    state = json.loads((work / STATE_FILE).read_text())["stages"]
    assert state["ppo"]["status"] == "failed" and state["sft"]["status"] == "done"
    assert "ppo | failed" in (work / "report" / "report.md").read_text()


def test_only_refuses_when_its_inputs_are_missing(tmp_path):
    cfg = load_pipeline_config(None, [f"out={tmp_path / 'p'}"])
    with pytest.raises(GptlabError, match="--only sft: the stages it reads from are not finished.*pretrain"):
        run_pipeline(cfg, only="sft", quiet=True)
    with pytest.raises(GptlabError, match="unknown stage 'nope'"):
        run_pipeline(cfg, from_stage="nope", quiet=True)


def test_config_layers_and_errors(tmp_path):
    assert parse_set(["pretrain.train.max_iters=200", "dpo.enabled=true", "corpus=x.txt"]) == \
        {"pretrain": {"train": {"max_iters": 200}}, "dpo": {"enabled": True}, "corpus": "x.txt"}
    cfg = load_pipeline_config(None, ["pretrain.train.max_iters=7"])
    assert cfg.pretrain["train"]["max_iters"] == 7 and cfg.pretrain["train"]["batch_size"] == 16  # merged, not replaced
    with pytest.raises(GptlabError, match="expected SECTION.KEY=VALUE"):
        parse_set(["pretrain.train.max_iters"])
    y = tmp_path / "c.yaml"
    y.write_text("pretrian: {}\n")
    with pytest.raises(GptlabError, match=r"unknown pipeline config sections \['pretrian'\]"):
        load_pipeline_config(y)
    assert resume_command(["pipeline", "--config", "a.yaml", "--from", "ppo", "--set", "x=1"]) == \
        "gptlab pipeline --config a.yaml --set x=1"


PLAY = """ROMEO.
But soft, what light through yonder window breaks? It is the east, and love is the sun.

[Exit.]

JULIET:
O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name, for love.

Nurse.
Short.
"""


def test_speech_parsing_and_the_judge_by_hand():
    sp = parse_speeches(PLAY, min_words=5)
    assert [s.speaker for s in sp] == ["Romeo", "Juliet"]  # both layouts; too-short speech dropped
    assert sp[0].text.endswith("love is the sun.")
    assert topic_of("What might Romeo say of love?") == "love"
    # 2 (mentions love) + 0.5 (second mention) + 0.5 (ends with '.') = 3.0
    assert judge("Speak as Romeo about love.", "Love, love is sweet and kind to me.") == 3.0
    # no mention, unfinished, and too short (< 5 words): 0 + 0 - 1
    assert judge("Speak as Romeo about love.", "hello there") == -1.0


def test_synthetic_data_is_deterministic_and_ranked_by_the_judge(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    a = make_datasets([text], tmp_path / "a", n_sft=40, n_pref=30, n_prompts=10, n_cloze=10)
    make_datasets([text], tmp_path / "b", n_sft=40, n_pref=30, n_prompts=10, n_cloze=10)
    for f in ("sft", "preferences", "prompts", "cloze"):
        assert (tmp_path / "a" / f"{f}.jsonl").read_bytes() == (tmp_path / "b" / f"{f}.jsonl").read_bytes()
    assert a["preferences"] == 30
    for line in (tmp_path / "a" / "preferences.jsonl").read_text().splitlines():
        row = json.loads(line)
        scores = [judge(row["prompt"], r) for r in row["responses"]]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)  # strict ranking
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    assert all(re.search(topic_of(r["prompt"]), r["response"], re.I) for r in sft)  # demonstrations are on topic
    cloze = [json.loads(x) for x in (tmp_path / "a" / "cloze.jsonl").read_text().splitlines()]
    assert all(len(c["choices"]) == 4 and 0 <= c["answer"] < 4 for c in cloze)
