"""DPO: reference log-probs against a direct computation, and a tiny run that raises the chosen-vs-rejected margin."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.align.data import load_preferences
from gptlab.align.dpo import collate, dpo, make_pairs, reference_logprobs, sequence_logprobs
from gptlab.chat.template import ensure_chat_tokens
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import load_run, write_run_config
from gptlab.tokenizer import CharTokenizer
from gptlab.run.format import MODEL_FILE, save_model

ALPHABET = " abcdefghijklmnopqrstuvwxyz\n"
FAST = dict(dtype="float32", peak_flops=1e12, log_interval=1, eval_interval=0, eval_iters=4)


def _tok():
    return ensure_chat_tokens(CharTokenizer(ALPHABET))


def _sft_run(d: Path) -> Path:
    torch.manual_seed(1)
    tok = _tok()
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    write_run_config(d, cfg, tok, stage="sft")
    save_model(GPT(cfg), d / MODEL_FILE)
    return d


def _prefs(n: int, seed: int) -> list[dict]:
    """Chosen answers are made of a/b, rejected ones of y/z: a preference one character decides."""
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice("cdefg") for _ in range(4)),
             "chosen": "".join(rng.choice("ab") for _ in range(5)),
             "rejected": "".join(rng.choice("yz") for _ in range(5))} for _ in range(n)]


def test_reference_logprobs_match_a_direct_computation():
    tok = _tok()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    prefs = load_preferences([{"prompt": "hi", "responses": ["abc", "a longer one", "z"]}])
    pairs, _ = make_pairs(tok, prefs, 64)
    assert len(pairs) == 3  # all C(3,2) pairs: (0,1), (0,2), (1,2)
    ref = reference_logprobs(model, pairs, tok.eot_id, 2, torch.device("cpu"), torch.autocast("cpu", enabled=False))

    def direct(ids: list[int], start: int) -> float:  # Σ log p(token | prefix) over the response and its <|end|>
        logp = F.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
        return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))

    for k, p in enumerate(pairs):
        assert p.chosen.ids[-1] == tok.special_tokens["<|end|>"]
        assert ref[k, 0].item() == pytest.approx(direct(p.chosen.ids, p.chosen.start), abs=1e-4)
        assert ref[k, 1].item() == pytest.approx(direct(p.rejected.ids, p.rejected.start), abs=1e-4)
    # response tokens only: the response text ("abc" + <|end|>) is 4 tokens
    assert len(pairs[0].chosen.ids) - pairs[0].chosen.start == 4
    # right padding in a batch changes nothing
    b = collate(pairs, tok.eot_id)
    torch.testing.assert_close(sequence_logprobs(model, b.x, b.start, b.end), torch.cat([ref[:, 0], ref[:, 1]]),
                               rtol=1e-5, atol=1e-5)


def test_tiny_dpo_run_raises_the_chosen_vs_rejected_margin(tmp_path):
    sft = _sft_run(tmp_path / "sft")
    out = tmp_path / "dpo"
    res = dpo(out, _prefs(80, 0), init_from=sft, beta=0.1, epochs=3, heldout_fraction=0.2,
              train={**FAST, "lr": 3e-3, "batch_size": 8, "warmup_iters": 0}, quiet=True)
    assert res["heldout_margin"] > 0.5 and res["heldout_reward_accuracy"] >= 0.9
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    # step 1's loss is computed before any update, when the policy IS the reference: every implicit reward is 0
    # and the loss is -log σ(0) = log 2 — which also checks the precomputed reference log-probs line up
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < 0.5 * losses[0]
    run = load_run(out)
    assert run.config["stage"] == "dpo" and run.config["dpo"]["beta"] == 0.1
    # the trained policy prefers the chosen style on a fresh prompt, relative to the reference
    ref = load_run(sft).model
    prefs = load_preferences([{"prompt": "cdef", "chosen": "ababa", "rejected": "zyzyz"}])
    pairs, _ = make_pairs(run.tokenizer, prefs, 64)
    b = collate(pairs, run.tokenizer.eot_id)
    with torch.no_grad():
        pi, rf = sequence_logprobs(run.model, b.x, b.start, b.end), sequence_logprobs(ref, b.x, b.start, b.end)
    assert (pi[0] - rf[0]) - (pi[1] - rf[1]) > 0
    with pytest.raises(GptlabError, match="already holds a run"):
        dpo(out, _prefs(8, 0), init_from=sft, quiet=True)
