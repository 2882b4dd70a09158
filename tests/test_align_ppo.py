"""PPO (gptlab.align.experience / ppo / rlhf): a learning test against a programmatic reward, padding
(rewards, values and log-probs never read at pads, checked against per-row unpadded computation), the
missing-end penalty, the ratio guard, the NaN stop, bit-exact resume, the reward-model path and the CLI.
The GAE / clipped-loss arithmetic is tested by hand in test_align_losses.py."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.align.experience import ExperienceConfig, ExperienceMaker, layout
from gptlab.align.losses import token_logprobs
from gptlab.align.ppo import PPOConfig, PPOLoss, ppo
from gptlab.align.reward import RewardModel
from gptlab.chat.template import END, ensure_chat_tokens, render_ids
from gptlab.cli import main as cli_main
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import load_run, write_run_config
from gptlab.tokenizer.char import CharTokenizer
from gptlab.run.format import save_model
from gptlab.fileio import read_json
from gptlab.train.metrics import read_metrics

SPECIAL = re.compile(r"<\|[a-z]+\|>")
PROMPTS = [c * k for c in "abcd" for k in range(1, 9)]  # 32 one-turn prompts of different lengths


def frac_a(prompts, responses):
    """The programmatic reward: the fraction of 'a' among the response's characters."""
    out = []
    for r in responses:
        r = SPECIAL.sub("", r)
        out.append(r.count("a") / max(1, len(r)))
    return out


def _tok():
    return ensure_chat_tokens(CharTokenizer("abcd \n"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A tiny random "SFT" policy (char vocabulary + chat tokens): a normal run dir."""
    d = tmp_path_factory.mktemp("sft")
    tok = _tok()
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=48))
    write_run_config(d, m.cfg, tok, stage="sft")
    save_model(m, d / "model.safetensors")
    return d


def _cfg(**kw) -> dict:
    base = dict(iterations=2, rollout_prompts=16, minibatch_size=8, ppo_epochs=2, max_new_tokens=16, actor_lr=1e-3,
                critic_lr=1e-3, kl_coef=0.05, dtype="float32", frozen_dtype="float32", device="cpu", eval_prompts=8,
                eval_samples=2, missing_end_penalty=0.0, checkpoint_every=1)
    return {**base, **kw}


def test_ppo_raises_the_reward_with_bounded_kl(sft_run, tmp_path):
    """The learning test: 12 iterations × 32 rollouts lift the held-out fraction of 'a' from ~0.2 (a random
    policy over 10 tokens) to ≥ 0.6, by ≥ 0.3, while the KL to the reference is positive and below 8 nats."""
    t0 = time.perf_counter()
    out = tmp_path / "ppo"
    r = ppo(out, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True,
            config=_cfg(iterations=12, rollout_prompts=32, eval_samples=4))
    elapsed = time.perf_counter() - t0
    print(f"learning test: reward {r['reward_before']:.3f} -> {r['reward_after']:.3f}, KL {r['kl_after']:.3f} "
          f"(exact {r['kl_exact_after']:.3f}) in {elapsed:.1f}s")
    assert r["reward_before"] < 0.3
    assert r["reward_after"] >= 0.6 and r["reward_after"] - r["reward_before"] >= 0.3
    assert 0 < r["kl_after"] < 8 and 0 < r["kl_exact_after"] < 8
    assert abs(r["kl_before"]) < 1e-6  # the policy is the reference before training
    # every step logged the PPO statistics; each experience batch its reward/KL/timings
    recs = read_metrics(out / "metrics.jsonl")
    steps = [x for x in recs if "policy_loss" in x]
    assert len(steps) == 12 * 8
    for k in ("value_loss", "clipfrac", "approx_kl", "entropy", "explained_variance", "time_train"):
        assert all(k in x for x in steps), k
    batches = [x for x in recs if "reward_mean" in x]
    assert len(batches) == 12
    for k in ("reward_std", "kl", "response_length", "time_generate", "time_score", "kl_coef"):
        assert all(k in x for x in batches), k
    assert (out / "reward.png").stat().st_size > 0 and (out / "kl.png").stat().st_size > 0
    # the run dir holds the actor alone, loadable by `gptlab chat`; the critic is beside it
    run = load_run(out)
    assert run.model.cfg.head == "" and run.config["stage"] == "ppo"
    assert load_run(out / "critic").model.cfg.head == "scalar"
    summary = read_json(out / "ppo_summary.json", "summary")
    assert summary["samples_after"] and summary["reward_after"] == r["reward_after"]


def _maker(sft_run, reward_fn=None, reward_model=None, **kw):
    run = load_run(sft_run)
    torch.manual_seed(1)
    critic = GPT(run.model.cfg)
    critic.add_head("scalar", 1, 0.0)
    ref = GPT(run.model.cfg).eval()  # a different reference: the KL is not 0
    cfg = ExperienceConfig(**{"max_new_tokens": 12, "missing_end_penalty": 0.0, "forward_batch_size": 3, **kw})
    return ExperienceMaker(run.model.train(), critic, ref, run.tokenizer, cfg, reward_fn=reward_fn,
                           reward_model=reward_model), run


def test_rewards_values_and_logprobs_are_never_read_at_pads(sft_run):
    torch.manual_seed(2)
    rm_model = GPT(load_run(sft_run).model.cfg)
    rm_model.add_head("scalar", 1, 0.0)
    rm = RewardModel(rm_model.eval(), _tok(), offset=0.25)
    maker, run = _maker(sft_run, reward_model=rm)
    convs = [[{"role": "user", "content": p}] for p in ("a", "bbbbbbb", "cc", "dddd", "ab", "abcdabcd")]
    torch.manual_seed(3)
    exp = maker.make(convs, kl_coef=0.1)
    lengths = exp.mask.sum(1).tolist()
    assert len(set(lengths)) > 2 and len({len(render_ids(maker.tok, c)[0]) for c in convs}) > 2  # ragged both ways
    end_id = maker.tok.special_tokens[END]
    for i, conv in enumerate(convs):
        p = render_ids(maker.tok, conv)[0]
        resp = exp.targets[i, :lengths[i]].tolist()
        assert (resp[-1] == end_id) == bool(exp.ended[i])
        x = torch.tensor([p + resp])  # this row alone, unpadded: the naive reference
        with torch.no_grad():
            n = len(p)
            lp = token_logprobs(maker.actor(x)[0][:, n - 1:-1], x[:, n:])[0]
            ref_lp = token_logprobs(maker.ref(x)[0][:, n - 1:-1], x[:, n:])[0]
            v = maker.critic.head_logits(maker.critic.hidden(x))[0, n - 1:-1, 0]
            score = rm_model.head_logits(rm_model.hidden(x))[0, -1, 0] - 0.25  # at the final token
        L = lengths[i]
        torch.testing.assert_close(exp.logprobs[i, :L], lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.ref_logprobs[i, :L], ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.values[i, :L], v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exp.scores[i], score, atol=1e-5, rtol=1e-5)
        # per-token reward: −β·(lp − ref_lp), the score added at the last response token only
        want = -0.1 * (lp - ref_lp)
        want[-1] += score
        torch.testing.assert_close(exp.rewards[i, :L], want, atol=1e-5, rtol=1e-5)
        for t in (exp.logprobs, exp.values, exp.rewards, exp.advantages, exp.returns):
            assert (t[i, L:] == 0).all()  # nothing at pads
    # overwriting every pad of the batch changes nothing
    seq = exp.seq.clone()
    for i in range(len(convs)):
        seq[i, len(render_ids(maker.tok, convs[i])[0]) + lengths[i]:] = 3
    again = maker.forward_all(seq, exp.positions, exp.targets, exp.mask)
    torch.testing.assert_close(again[0], exp.logprobs)
    torch.testing.assert_close(again[2], exp.values)
    end_index = torch.tensor([len(render_ids(maker.tok, c)[0]) for c in convs]) + exp.mask.sum(1) - 1
    torch.testing.assert_close(maker.score(seq, end_index, [], []), exp.scores)


def test_layout_right_pads_and_points_at_the_predicting_state():
    seq, pos, tgt, mask = layout([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad=0)
    assert seq.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert tgt.tolist() == [[5, 6, 0], [7, 8, 9]] and mask.tolist() == [[True, True, False], [True, True, True]]
    assert pos.tolist() == [[2, 3, 3], [0, 1, 2]]  # state t predicts token t+1; pad columns point at a real one


def test_missing_end_penalty_is_subtracted_from_truncated_responses(sft_run):
    maker, _ = _maker(sft_run, reward_fn=lambda p, r: [1.0] * len(r), max_new_tokens=3, missing_end_penalty=0.7)
    torch.manual_seed(4)
    exp = maker.make([[{"role": "user", "content": "a" * k}] for k in range(1, 17)], kl_coef=0.0)
    ended = exp.ended.tolist()
    assert 0 < sum(ended) < len(ended)  # both kinds present
    end_id = maker.tok.special_tokens[END]
    for i, e in enumerate(ended):
        L = int(exp.mask[i].sum())
        assert exp.scores[i].item() == pytest.approx(1.0 if e else 0.3)
        assert (exp.targets[i, L - 1].item() == end_id) == e
        assert e or L == 3  # a response without <|end|> ran to max_new_tokens


def test_ratio_guard_skips_the_minibatch(sft_run, tmp_path):
    maker, run = _maker(sft_run, reward_fn=frac_a)
    from gptlab.align.ppo import ActorCritic

    torch.manual_seed(5)
    exp = maker.make([[{"role": "user", "content": "ab" * k}] for k in range(1, 5)], kl_coef=0.05)
    pair = ActorCritic(maker.actor, maker.critic)
    loss = PPOLoss(PPOConfig(ratio_guard=10.0, minibatch_size=4, rollout_prompts=4))
    assert loss(pair, (exp, None)) is not None  # fresh experience: ratio 1
    shifted = exp.select(list(range(4)))
    shifted.logprobs = shifted.logprobs - 5.0 * shifted.mask  # as if the policy moved by e^5 ≈ 148×
    assert loss(pair, (shifted, None)) is None
    assert loss.metrics()["skipped_minibatches"] == 1
    # in a run: a guard below 1 skips every minibatch, so no optimizer step happens and the actor is unchanged
    out = tmp_path / "guarded"
    ppo(out, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config=_cfg(iterations=1, ratio_guard=0.5))
    before, after = load_file(str(sft_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    steps = [x for x in read_metrics(out / "metrics.jsonl") if "skipped_minibatches" in x]
    assert len(steps) == 4 and all(x["skipped_minibatches"] == 1 for x in steps)


def test_nan_reward_stops_cleanly_and_keeps_the_last_good_checkpoint(sft_run, tmp_path):
    calls = {"n": 0}

    def flaky(prompts, responses):  # call 1: the before-eval; 2: iteration 0; then NaN
        calls["n"] += 1
        return [float("nan") if calls["n"] > 2 else 0.5] * len(responses)

    out = tmp_path / "nan"
    with pytest.raises(GptlabError, match="NaN"):
        ppo(out, PROMPTS, actor_from=sft_run, reward_fn=flaky, quiet=True, config=_cfg(iterations=3))
    assert read_json(out / "latest.json", "latest")["step"] == 4  # iteration 0's checkpoint, nothing after
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "model.safetensors")).values())


def test_resume_is_bit_exact(sft_run, tmp_path):
    cfg = _cfg(kl_target=0.5, kl_horizon=100, eval_prompts=4)  # the adaptive β is part of the resumed state
    full, part = tmp_path / "full", tmp_path / "part"
    a = ppo(full, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config=cfg)
    ppo(part, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config={**cfg, "iterations": 1})
    b = ppo(part, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config={"iterations": 2}, resume=True)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [(x["step"], x["loss"], x.get("kl_coef")) for x in read_metrics(full / "metrics.jsonl") if "loss" in x]
    lb = [(x["step"], x["loss"], x.get("kl_coef")) for x in read_metrics(part / "metrics.jsonl") if "loss" in x]
    assert la == lb
    kl_coefs = [x["kl_coef"] for x in read_metrics(full / "metrics.jsonl") if "kl_coef" in x]
    assert kl_coefs[0] == 0.05 and kl_coefs[1] != 0.05  # the controller moved β
    assert a["reward_after"] == b["reward_after"]
    with pytest.raises(GptlabError, match="cannot change"):
        ppo(part, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True, config={"minibatch_size": 4}, resume=True)


def _reward_run(sft_run: Path, d: Path) -> Path:
    run = load_run(sft_run)
    torch.manual_seed(6)
    run.model.add_head("scalar", 1, 0.0)
    torch.nn.init.normal_(run.model.head[1].weight, 0.0, 1.0)
    write_run_config(d, run.model.cfg, run.tokenizer, stage="reward", reward={"offset": 0.1, "read_at": END})
    save_model(run.model, d / "model.safetensors")
    return d


def test_reward_model_path_and_cli(sft_run, tmp_path, monkeypatch, capsys):
    rm_dir = _reward_run(sft_run, tmp_path / "rm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "ppo_rm"
    # four models: actor + critic (from the RM: its head is the critic's start), frozen RM + reference in bf16
    r = ppo(out, str(prompts), actor_from=sft_run, reward_from=rm_dir, quiet=True,
            config=_cfg(iterations=1, frozen_dtype="bfloat16", missing_end_penalty=1.0))
    assert r["reward_after"] is not None and r["step"] == 4
    conf = read_json(out / "config.json", "config")
    assert conf["init"]["reward_from"] == str(rm_dir.resolve()) and conf["ppo"]["frozen_dtype"] == "bfloat16"
    # the CLI, with a reward function given as module:function
    (tmp_path / "my_rewards.py").write_text("def count_a(prompts, responses):\n"
                                            "    return [r.count('a') / max(1, len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yaml_cfg = tmp_path / "ppo.yaml"
    yaml_cfg.write_text("".join(f"{k}: {v}\n" for k, v in _cfg(iterations=1).items()))
    rc = cli_main(["ppo", "--from", str(sft_run), "--prompts", str(prompts), "--reward-fn", "my_rewards:count_a",
                   "--out", str(tmp_path / "cli"), "--config", str(yaml_cfg), "--ppo.kl_target", "none",
                   "--ppo.eval_samples", "1", "--json"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["step"] == 4
    rc = cli_main(["ppo", "--from", str(sft_run), "--prompts", str(prompts), "--reward-fn", "my_rewards:nope",
                   "--out", str(tmp_path / "cli2")])
    assert rc == 2 and "cannot import my_rewards:nope" in capsys.readouterr().err
    rc = cli_main(["ppo", "--from", str(sft_run), "--prompts", str(prompts), "--reward-fn", "my_rewards:count_a",
                   "--out", str(tmp_path / "cli3"), "--ppo.minibatch_size", "5"])
    assert rc == 2 and "multiple of minibatch_size" in capsys.readouterr().err


def test_ptx_mixes_in_the_pretraining_loss(sft_run, tmp_path):
    from gptlab.data.prepare import prepare

    base = tmp_path / "base.gptlab.json"
    CharTokenizer("abcd \n").save(base)  # the actor's ids without the chat tokens
    (tmp_path / "corpus.txt").write_text("abcd dcba\n" * 400)
    prepare(str(tmp_path / "corpus.txt"), str(tmp_path / "data"), tokenizer=str(base), val_fraction=0.1, num_workers=1)
    out = tmp_path / "ptx"
    ppo(out, PROMPTS, actor_from=sft_run, reward_fn=frac_a, quiet=True,
        config=_cfg(iterations=1, ptx_coef=0.5, ptx_data=str(tmp_path / "data"), ptx_batch_size=2))
    steps = [x for x in read_metrics(out / "metrics.jsonl") if "policy_loss" in x]
    assert steps and all(x["ptx_loss"] > 0 for x in steps)
    for x in steps:  # loss = policy + vf_coef · value + ptx_coef · LM
        assert x["loss"] == pytest.approx(x["policy_loss"] + 0.1 * x["value_loss"] + 0.5 * x["ptx_loss"], rel=1e-4)


def test_rlhf_chains_reward_model_and_ppo_rounds(sft_run, tmp_path):
    from gptlab.align.rlhf import rlhf

    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": p, "chosen": "a" * (1 + k % 3), "rejected": "b" * (1 + k % 4)} for k, p in enumerate(PROMPTS)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = []

    def judge(prompt, responses):  # more 'a' is better
        judged.append(prompt)
        return sorted(range(len(responses)), key=lambda i: -frac_a([], [responses[i]])[0])

    train = {"batch_size": 4, "eval_interval": 0, "log_interval": 1, "dtype": "float32", "device": "cpu",
             "checkpoint_interval": 0, "lr": 1e-3}
    out = tmp_path / "rlhf"
    s = rlhf(out, sft_from=sft_run, preferences=str(prefs), prompts=PROMPTS, rounds=2, judge=judge,
             reward={"epochs": 1, "heldout_fraction": 0.2, "train": train, "judge_prompts": 8, "judge_samples": 3},
             ppo=_cfg(iterations=1, eval_samples=1), quiet=True)
    assert [r["round"] for r in s["rounds"]] == [1, 2]
    r1, r2 = s["rounds"]
    assert r1["reward_data"] == str(prefs)  # round 1: the given comparisons
    assert r2["reward_data"] == str(out / "round_2" / "comparisons.jsonl") and len(judged) == 8  # round 2: judged
    rows = [json.loads(x) for x in (out / "round_2" / "comparisons.jsonl").read_text().splitlines()]
    assert all(frac_a([], r["responses"]) == sorted(frac_a([], r["responses"]), reverse=True) for r in rows)
    assert r2["started_from"] == str(out / "round_1" / "ppo") and s["policy"] == str(out / "round_2" / "ppo")
    conf = read_json(out / "round_2" / "ppo" / "config.json", "config")
    assert conf["init"]["reference_from"] == str(sft_run.resolve())  # the KL reference stays the SFT model
    assert read_json(out / "summary.json", "summary")["policy"] == s["policy"]
    load_run(Path(s["policy"]))
    # a finished round is not redone
    again = rlhf(out, sft_from=sft_run, preferences=str(prefs), prompts=PROMPTS, rounds=2, judge=judge,
                 reward={"epochs": 1, "train": train, "judge_prompts": 8, "judge_samples": 3},
                 ppo=_cfg(iterations=1, eval_samples=1), quiet=True)
    assert again["rounds"] == s["rounds"] and len(judged) == 8


def test_rlhf_cli_checks_its_inputs(sft_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    rc = cli_main(["rlhf", "--from", str(sft_run), "--prompts", str(prompts), "--out", str(tmp_path / "r")])
    assert rc == 2 and "--preferences" in capsys.readouterr().err
    rc = cli_main(["rlhf", "--from", str(sft_run), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
                   "--judge", "nosuchmodule_xyz:judge"])
    assert rc == 2 and "cannot import nosuchmodule_xyz:judge" in capsys.readouterr().err
    rc = cli_main(["rlhf", "--from", str(sft_run), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
                   "--preferences", "x.jsonl", "--ppo.minibatch_size", "3"])
    assert rc == 2 and "multiple of minibatch_size" in capsys.readouterr().err


def test_dropout_is_off_in_the_trained_actor_and_critic(tmp_path):
    """An SFT run with dropout (attention dropout included, which lives in the config, not in an nn.Dropout):
    PPO's training forward must match the eval-mode forward that recorded the old log-probs and values."""
    from gptlab.align.ppo import ActorCritic, _load_models

    tok = _tok()
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=48, embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3))
    d = tmp_path / "sft_dropout"
    write_run_config(d, m.cfg, tok, stage="sft")
    save_model(m, d / "model.safetensors")
    cfg = PPOConfig.from_dict(_cfg())
    actor, critic, ref, _, tok, _ = _load_models(d, None, None, d, cfg, torch.device("cpu"))
    pair = ActorCritic(actor, critic)
    torch.manual_seed(1)
    seq = torch.randint(0, tok.vocab_size, (3, 24))
    pos = torch.arange(8, 20).expand(3, -1)
    tgt = seq.gather(1, pos + 1)
    with torch.no_grad():
        pair.eval()
        lp_eval, v_eval, _ = pair(seq, pos, tgt)
        pair.train()
        for _ in range(2):
            lp, v, _ = pair(seq, pos, tgt)
            torch.testing.assert_close(lp, lp_eval, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(v, v_eval, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("key,value", [("clip", -1), ("clip", 1.5), ("lam", 2), ("gamma", -0.1), ("actor_lr", -1),
                                       ("actor_lr", 0), ("eval_samples", 0), ("max_new_tokens", 0), ("value_clip", -0.2),
                                       ("vf_coef", -1), ("micro_batch_size", -1)])
def test_out_of_range_ppo_settings_are_one_line_errors(key, value):
    with pytest.raises(GptlabError, match=f"ppo.{key} must be"):
        PPOConfig.from_dict({key: value})


def test_rlhf_without_heldout_prompts_prints_its_summary(sft_run, tmp_path, capsys):
    from gptlab.align.rlhf import rlhf

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) + "\n" for p in PROMPTS))
    train = {"batch_size": 4, "max_iters": 2, "eval_interval": 0, "dtype": "float32", "device": "cpu",
             "checkpoint_interval": 0}
    s = rlhf(tmp_path / "rlhf", sft_from=sft_run, preferences=str(prefs), prompts=PROMPTS, rounds=1,
             reward={"train": train}, ppo=_cfg(iterations=1, eval_prompts=0), quiet=False)
    assert s["rounds"][0]["reward_after"] is None  # no held-out prompts: nothing measured, and no crash printing it
    assert "reward n/a -> n/a" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [lambda p, r: 1.0, lambda p, r: [None] * len(r), lambda p, r: ["x"] * len(r)])
def test_a_reward_fn_returning_non_numbers_is_a_one_line_error(sft_run, bad):
    maker, _ = _maker(sft_run, reward_fn=bad, max_new_tokens=2)
    with pytest.raises(GptlabError, match="reward_fn must return a list of numbers"):
        maker.make([[{"role": "user", "content": "ab"}]] * 2, kl_coef=0.0)
