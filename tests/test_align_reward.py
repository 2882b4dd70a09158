"""Reward model (InstructGPT step 2): HH splitting, reading at <|end|> (never a pad), learning a separable
preference, the offset, and the run dir round trip."""

import json
import random
from pathlib import Path

import pytest
import torch

from gptlab.align.data import LoadStats, Preference, load_preferences, load_prompts, split_hh_dialogue
from gptlab.align.reward import (RewardModel, collate, encode_response, prompt_ids, raw_rewards, token_scores,
                                 train_reward)
from gptlab.chat.template import ensure_chat_tokens
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import write_run_config
from gptlab.tokenizer import CharTokenizer
from gptlab.run.format import MODEL_FILE, save_model

ALPHABET = " abcdefghijklmnopqrstuvwxyz\n"
END = 32  # <|end|>: after <|endoftext|> (28), <|system|>, <|user|>, <|assistant|>
FAST = dict(dtype="float32", peak_flops=1e12, log_interval=5, eval_interval=20, eval_iters=4)


def _tok():
    return ensure_chat_tokens(CharTokenizer(ALPHABET))


def _run(d: Path, block_size: int = 64) -> Path:
    """A stand-in SFT run: a tiny char GPT that already has the chat tokens."""
    torch.manual_seed(1)
    tok = _tok()
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size)
    write_run_config(d, cfg, tok, stage="sft")
    save_model(GPT(cfg), d / MODEL_FILE)
    return d


def _rm_model(block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=33, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                   embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    m.add_head("scalar", 1, head_pdrop=0.0)
    return m.eval()


# --- HH dialogues ---------------------------------------------------------------------------------------
def test_hh_dialogues_split_into_turns_prompt_and_two_responses(tmp_path):
    chosen = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out\n\nAssistant: Call a locksmith."
    rejected = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out\n\nAssistant: Use a bobby pin."
    assert split_hh_dialogue(chosen) == [
        {"role": "user", "content": "how do I pick a lock?"}, {"role": "assistant", "content": "Why?"},
        {"role": "user", "content": "I'm locked out"}, {"role": "assistant", "content": "Call a locksmith."}]
    p = tmp_path / "hh.jsonl"
    rows = [{"chosen": chosen, "rejected": rejected},
            {"chosen": chosen, "rejected": chosen},                                             # no comparison
            {"chosen": chosen, "rejected": rejected.replace("I'm locked out", "never mind")}]   # prefixes differ
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = LoadStats()
    prefs = load_preferences(p, stats=stats)
    assert prefs == [Preference(split_hh_dialogue(chosen)[:-1], ["Call a locksmith.", "Use a bobby pin."])]
    assert stats.rows == 3 and sum(stats.skipped.values()) == 2
    assert load_prompts(p) == [prefs[0].prompt]
    with pytest.raises(GptlabError, match=r"row 1 \(chosen\): not an HH dialogue"):
        load_preferences([{"chosen": "hi there", "rejected": "x"}])


def test_the_shared_hh_file_loads(shared_data):
    stats = LoadStats()
    prefs = load_preferences(shared_data / "preferences" / "hh_harmless_1800.jsonl", stats=stats, quiet=True)
    assert stats.rows == 1800 and len(prefs) + sum(stats.skipped.values()) == 1800 and len(prefs) >= 1790
    assert all(p.prompt[-1]["role"] == "user" and len(p.responses) == 2 for p in prefs)


def test_ranked_and_pair_layouts():
    prefs = load_preferences([{"prompt": "q", "responses": ["a", "b", "c"]},
                              {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                               "chosen": "x", "rejected": "y"}])
    assert prefs[0].responses == ["a", "b", "c"] and prefs[1].prompt[0]["role"] == "system"
    with pytest.raises(GptlabError, match="row 1: 'responses' needs at least two"):
        load_preferences([{"prompt": "q", "responses": ["a"]}])


# --- reading at <|end|> ----------------------------------------------------------------------------------
def test_reward_is_read_at_end_never_at_a_pad():
    tok, model = _tok(), _rm_model()
    prompt = [{"role": "user", "content": "hello"}]
    pid = prompt_ids(tok, prompt)
    short = encode_response(tok, pid, "ok", 64)
    long = encode_response(tok, pid, "a much longer answer", 64)
    assert short.ids[short.end] == END and long.ids[long.end] == END and short.end == len(short.ids) - 1
    b = collate([[long.ids, short.ids]], pad=tok.eot_id)
    assert b.x.shape == (2, len(long.ids)) and b.end.tolist() == [long.end, short.end]
    batched = raw_rewards(model, b.x, b.end)
    alone = [raw_rewards(model, torch.tensor([s.ids]), torch.tensor([s.end]))[0] for s in (long, short)]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-5)
    # reading the padded row's last column (a pad position) would give a different number
    at_last = token_scores(model, b.x)[:, -1]
    assert abs(at_last[1] - alone[1]) > 1e-3
    # left-padded rows (the generator's layout) score like the unpadded sequence when the padding is given
    L = len(long.ids)
    left = torch.tensor([[tok.eot_id] * (L - len(short.ids)) + short.ids])
    got = token_scores(model, left, pad=torch.tensor([L - len(short.ids)]))[0, -1]
    torch.testing.assert_close(got, alone[1], rtol=1e-4, atol=1e-4)
    # RewardModel.score batches texts of different lengths the same way
    rm = RewardModel(model, tok, offset=0.25)
    torch.testing.assert_close(torch.tensor(rm.score([prompt, prompt], ["a much longer answer", "ok"], batch_size=2)),
                               torch.stack(alone) - 0.25, rtol=1e-5, atol=1e-5)


# --- learning, offset, round trip ----------------------------------------------------------------------
def _synthetic(n: int, seed: int) -> list[dict]:
    """Ranked by how many 'a' a response has (K = 3): separable by counting one character."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("bcdefg") for _ in range(4))
        resp = []
        for n_a in (4, 2, 0):
            chars = ["a"] * n_a + [rng.choice("xyz") for _ in range(6 - n_a)]
            rng.shuffle(chars)
            resp.append("".join(chars))
        rows.append({"prompt": prompt, "responses": resp})
    return rows


def test_tiny_rm_learns_a_separable_preference_offset_and_round_trip(tmp_path):
    sft = _run(tmp_path / "sft")
    out = tmp_path / "rm"
    res = train_reward(out, _synthetic(120, 0), init_from=sft, epochs=4, heldout_fraction=0.2,
                       train={**FAST, "lr": 3e-3, "batch_size": 8}, quiet=True)
    assert res["heldout_accuracy"] >= 0.9 and res["train_accuracy"] >= 0.9
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("heldout_accuracy" in m for m in metrics) >= 2 and (out / "accuracy.png").is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["head"] == "scalar" and conf["model"]["head_out"] == 1
    assert conf["reward"]["read_at"] == "<|end|>" and conf["reward"]["offset"] == pytest.approx(res["offset"])
    # reloaded: same scores as a direct forward minus the offset; the reference set (best-ranked held-out
    # responses) averages 0 after normalisation
    rm = RewardModel.load(out)
    prefs = load_preferences(_synthetic(120, 0))
    from gptlab.stage import split_heldout

    _, held = split_heldout(len(prefs), 0.2, 1337)
    ref = [prefs[i] for i in held]
    scores = rm.score([p.prompt for p in ref], [p.responses[0] for p in ref])
    assert abs(sum(scores) / len(scores)) < 1e-4
    e = encode_response(rm.tokenizer, prompt_ids(rm.tokenizer, ref[0].prompt), ref[0].responses[0], 64)
    direct = raw_rewards(rm.model, torch.tensor([e.ids]), torch.tensor([e.end]))[0].item() - res["offset"]
    assert scores[0] == pytest.approx(direct, abs=1e-5)
    assert rm.score_ids(torch.tensor([e.ids]), torch.tensor([e.end]))[0].item() == pytest.approx(direct, abs=1e-5)
    # the CLI scores a preference file
    from gptlab.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _synthetic(10, 5)))
    assert main(["reward", "score", str(out), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 0
    got = [json.loads(ln)["scores"] for ln in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(got) == 10 and all(len(s) == 3 for s in got)


def test_not_a_reward_model_is_refused(tmp_path):
    with pytest.raises(GptlabError, match="not a reward-model run"):
        RewardModel.load(_run(tmp_path / "sft"))


def test_score_refuses_a_zero_batch_size():
    rm = RewardModel(_rm_model(), _tok(), 0.0)
    with pytest.raises(GptlabError, match="batch size must be ≥ 1"):
        rm.score([[{"role": "user", "content": "hi"}]], ["yo"], batch_size=0)
