"""GRPO / RLOO (`gptlab grpo`): the group advantages by hand, learning tests against a programmatic reward
(no critic; GRPO's KL as a loss term), verifiable rewards from the prompt rows' answers, the CLI, bad input."""

import json

import pytest
import torch

from gptlab.align.losses import group_advantages
from gptlab.align.ppo import grpo
from gptlab.align.verify import answer_reward, matches
from gptlab.chat.template import render_text
from gptlab.cli import main as cli
from gptlab.errors import GptlabError
from gptlab.train.metrics import read_metrics
from test_align_ppo import PROMPTS, _cfg, frac_a, sft_run  # noqa: F401  (the fixture)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    g = group_advantages(r, 4, "grpo")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as GRPO's implementations compute it
    torch.testing.assert_close(g[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert torch.equal(g[4:], torch.zeros(4))  # equal rewards: nothing to learn from the group
    rl = group_advantages(r, 4, "rloo")
    torch.testing.assert_close(rl[:4], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert torch.equal(rl[4:], torch.zeros(4))


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_rl_raises_the_reward_without_a_critic(sft_run, tmp_path, advantage):  # noqa: F811
    out = tmp_path / advantage
    cfg = _cfg(iterations=12, rollout_prompts=4, samples_per_prompt=8, minibatch_size=8, ppo_epochs=2, eval_samples=4,
               advantage=advantage, actor_lr=2e-3)
    if advantage == "rloo":
        cfg.update(kl_penalty="reward", kl_estimator="k1")
    r = grpo(out, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config=cfg)
    assert r["reward_before"] < 0.3 and r["reward_after"] - r["reward_before"] >= 0.25, r
    assert 0 < r["kl_after"] < 8
    steps = [x for x in read_metrics(out / "metrics.jsonl") if "policy_loss" in x]
    assert steps and all("value_loss" not in x for x in steps)
    assert all(("kl_loss" in x) == (advantage == "grpo") for x in steps)
    assert not (out / "critic").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["stage"] == "grpo" and saved["ppo"]["advantage"] == advantage


def test_answers_are_checked_by_exact_number_and_regex(tmp_path):
    assert matches(" 42 ", "42", "exact") and not matches("42!", "42", "exact")
    assert matches("so it is 1,234.", "1234", "number") and not matches("12 then 13", "12", "number")
    assert matches("the answer: Paris", r"\bParis\b", "regex") and not matches("Parisian", r"\bParis\b", "regex")
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = answer_reward(f, "number")
    prompts = [render_text([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True) for r in rows]
    assert reward(prompts, ["it is 2", "5"]) == [1.0, 0.0]
    f.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(GptlabError, match="answer"):
        answer_reward(f, "exact")


def test_grpo_cli_with_a_verifiable_reward_resumes(sft_run, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": "a" * 3}) + "\n" for p in PROMPTS))
    out = tmp_path / "run"
    base = ["grpo", "--from", str(sft_run), "--prompts", str(f), "--out", str(out), "--reward-fn", "match:regex",
            "--grpo.max_new_tokens", "8", "--grpo.eval_prompts", "4", "--grpo.dtype", "float32",
            "--grpo.frozen_dtype", "float32", "--grpo.checkpoint_every", "1"]
    assert cli([*base, "--grpo.iterations", "1"]) == 0
    assert cli(["grpo", "--out", str(out), "--resume", "--grpo.iterations", "2"]) == 0  # the checker comes back
    assert json.loads((out / "config.json").read_text())["init"]["reward_fn"] == "match:regex"
    capsys.readouterr()
    assert cli([*base[:-2], "--out", str(tmp_path / "bad"), "--grpo.samples_per_prompt", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "samples_per_prompt must be ≥ 2" in err
    assert cli(["grpo", "--from", str(sft_run), "--prompts", str(f), "--out", str(tmp_path / "b2"),
                "--reward-fn", "match:fuzzy"]) == 2
    assert "match:exact" in capsys.readouterr().err
