"""The stage layer's pieces on their own: resolution order, start/resume checks, the schedule, seeded
orders and subsets, micro-batch weights, and the one configuration path."""

import argparse

import pytest
import torch

from gptlab.config import add_dataclass_args, coerce, read_config, section_layer
from gptlab.errors import GptlabError
from gptlab.model import GPT, preset
from gptlab.run import write_run_config
from gptlab.run.format import MODEL_FILE, save_model, tied_names
from gptlab.stage import EpochOrder, begin, eval_subsets, load_pretrained, resolve_train, schedule, split_heldout
from gptlab.tokenizer import train_bpe


def test_resolution_order_recipe_then_layers_and_the_keys_set():
    recipe = {"lr": 1e-3, "batch_size": 8, "schedule": "linear"}
    cfg, given = resolve_train("mine", recipe, {"lr": "2e-3", "recipe": "ignored"}, {"batch_size": 4}, {})
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.schedule) == ("mine", 2e-3, 4, "linear")
    assert given == {"lr", "batch_size"}
    cfg, _ = resolve_train("mine", recipe, {"lr": 5e-4}, {"lr": 7e-4})  # the later layer wins
    assert cfg.lr == 7e-4
    with pytest.raises(GptlabError, match="unknown train config keys: nope"):
        resolve_train("mine", recipe, {"nope": 1})


def test_begin_refuses_another_run_and_resume_checks_the_stage(tmp_path):
    tok = train_bpe(["hello world"] * 4, 5, progress=False)
    out = tmp_path / "run"
    st = begin(out, "sft", resume=False)
    assert not st.resume and st.saved == {} and st.train_layers({"lr": 1}) == ({"lr": 1},)
    write_run_config(out, preset("tiny", vocab_size=tok.vocab_size), tok, stage="sft",
                     train={"lr": 1e-4, "max_iters": 50, "warmup_iters": 5}, sft={"epochs": 2, "max_iters_given": False})
    (out / "latest.json").write_text("{}")
    with pytest.raises(GptlabError, match="already holds a run"):
        begin(out, "sft", resume=False)
    with pytest.raises(GptlabError, match="holds a 'sft' run, not a dpo run"):
        begin(out, "dpo", resume=True)
    with pytest.raises(GptlabError, match="run directory not found"):
        begin(tmp_path / "missing", "sft", resume=True)
    st = begin(out, "sft", resume=True)
    # max_iters/warmup_iters were computed from the epochs: recomputed on resume, the rest comes back
    assert st.train_layers({"lr": 2e-4}) == ({"lr": 1e-4}, {"lr": 2e-4})
    assert st.kept("epochs", 9) == 2 and st.section()["max_iters_given"] is False
    assert st.data("given.jsonl", "demonstrations") == "given.jsonl"
    with pytest.raises(GptlabError, match="in-memory rows"):
        st.data(None, "demonstrations")


def test_train_layers_of_runs_that_did_not_record_max_iters_given(tmp_path):
    tok = train_bpe(["hello world"] * 4, 5, progress=False)
    write_run_config(tmp_path, preset("tiny", vocab_size=tok.vocab_size), tok, stage="finetune",
                     train={"max_iters": 50, "warmup_iters": 5, "lr": 1e-4}, task={"epochs": 3})
    st = begin(tmp_path, "finetune", resume=True)
    assert st.train_layers(section="task")[0]["max_iters"] == 50  # kept: the epochs were not given again
    assert "max_iters" not in st.train_layers(section="task", epochs_given=True)[0]


def test_schedule_counts_epochs_over_processes_and_keeps_what_was_set():
    cfg, given = resolve_train("r", {"batch_size": 8, "grad_accum": 2}, {})
    s = schedule(cfg, given, n_train=100, epochs=2.0, warmup_fraction=0.1, world=2)
    assert (s.max_iters, s.warmup_iters) == (7, 1)  # ceil(2·100 / (8·2·2)), ceil(0.1·7)
    assert (s.warmup_tokens, s.decay_tokens, s.batch_warmup_tokens) == (0, 0, 0)
    cfg, given = resolve_train("r", {"batch_size": 8}, {"max_iters": 3, "warmup_iters": 0})
    assert (schedule(cfg, given, 100, 2.0, 0.1).max_iters, schedule(cfg, given, 100, 2.0, 0.1).warmup_iters) == (3, 0)
    for bad in (0, -1, float("nan"), "2"):
        with pytest.raises(GptlabError, match="epochs must be a positive number"):
            schedule(cfg, given, 100, bad, 0.1)


def test_eval_subsets_and_heldout_split_are_seeded_and_independent_of_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = eval_subsets(7, (10, 3), (20, 5))
    g = torch.Generator().manual_seed(7)  # the reference: one generator, drawn in turn
    assert a == torch.randperm(10, generator=g)[:3].tolist() and b == torch.randperm(20, generator=g)[:5].tolist()
    assert eval_subsets(7, (10, 3), (20, 5)) == [a, b] and torch.equal(torch.get_rng_state(), state)
    train, held = split_heldout(20, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20)) and split_heldout(20, 0.25, 3) == (train, held)
    assert split_heldout(5, 0.0, 3) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(GptlabError, match="too few"):
        split_heldout(1, 0.5, 3)


def test_micro_batch_weights_make_the_step_a_mean_over_all_its_tokens():
    order = EpochOrder(6, seed=1)
    tokens = [1, 2, 3, 4, 5, 6].__getitem__
    step, n = 0, 4  # a step of 4 examples as 2 micro-batches of 2
    halves = [slice(0, 2), slice(2, 4)]
    idx = order.indices(step, slice(0, n), n)
    total = sum(tokens(i) for i in idx)
    w = [order.micro_weight(step, sl, n, tokens) for sl in halves]
    # the engine averages micro-batch means: Σ_m w_m · mean_m / M must equal Σ tokens·loss / Σ tokens
    for sl, wm in zip(halves, w):
        part = order.indices(step, sl, n)
        assert wm == pytest.approx(sum(tokens(i) for i in part) * 2 / total)
    assert sum(w) / 2 == pytest.approx(1.0)


def test_load_pretrained_drops_the_task_head_and_keeps_the_tie(tmp_path):
    tok = train_bpe(["hello world"] * 4, 5, progress=False)
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_size=tok.vocab_size))
    m.add_head("classifier", 3)
    write_run_config(tmp_path, m.cfg, tok, stage="finetune")
    save_model(m, tmp_path / MODEL_FILE)
    loaded, _ = load_pretrained(tmp_path, {"embd_pdrop": 0.2})
    assert not loaded.cfg.head and not hasattr(loaded, "head") and loaded.cfg.embd_pdrop == 0.2
    assert loaded.lm_head.weight is loaded.wte.weight and tied_names(loaded) == {"lm_head.weight"}
    assert torch.equal(loaded.wte.weight, m.wte.weight)
    with pytest.raises(GptlabError, match="cannot change when fine-tuning"):
        load_pretrained(tmp_path, {"n_layer": 3})


def test_one_configuration_path(tmp_path):
    from gptlab.align.ppo_config import PPOConfig

    assert coerce(PPOConfig, {"kl_target": "none", "value_clip": "0.5", "eval_prompts": "12", "top_k": "3"}, "ppo") == \
        {"kl_target": None, "value_clip": 0.5, "eval_prompts": 12, "top_k": 3}
    assert coerce(PPOConfig, {"eval_prompts": "held.txt", "kl_coef": 1}, "ppo") == {"eval_prompts": "held.txt", "kl_coef": 1.0}
    with pytest.raises(GptlabError, match="ppo.top_k"):
        coerce(PPOConfig, {"top_k": "many"}, "ppo")
    y = tmp_path / "c.yaml"
    y.write_text("ppo: {kl_coef: 0.05, iterations: 3}\nout: somewhere\n")
    p = argparse.ArgumentParser()
    add_dataclass_args(p, PPOConfig, "ppo")
    a = p.parse_args(["--ppo.iterations", "7"])
    conf = read_config(y, ("ppo",), top=("out",))
    assert section_layer(a, conf, PPOConfig, "ppo") == {"kl_coef": 0.05, "iterations": 7}  # the flag wins
    y.write_text("trian: {lr: 1}\n")
    with pytest.raises(GptlabError, match=r"unknown top-level keys \['trian'\].*train: \{\.\.\.\}"):
        read_config(y, ("train",))


def test_group_by_length_keeps_each_epoch_a_permutation_and_sorts_each_run():
    lengths = [(7 * i) % 23 for i in range(50)]
    plain, grouped = EpochOrder(50, seed=2), EpochOrder(50, seed=2, lengths=lengths, group=8)
    for epoch in (0, 1):
        p, g = plain.perm(epoch), grouped.perm(epoch)
        assert sorted(g) == list(range(50))
        for k in range(0, 50, 8):  # the same examples share a run; inside it, longest first
            assert sorted(g[k:k + 8]) == sorted(p[k:k + 8])
            assert [lengths[i] for i in g[k:k + 8]] == sorted((lengths[i] for i in p[k:k + 8]), reverse=True)
    # batches of 4 now pad to far less than random ones (the point of it)
    pad = lambda order: sum(max(lengths[i] for i in order.indices(s, slice(0, 4), 4)) for s in range(12))  # noqa: E731
    assert pad(grouped) < 0.9 * pad(plain)
    assert grouped.indices(5, slice(1, 3), 4) == grouped.indices(5, slice(0, 4), 4)[1:3]  # still a pure function
