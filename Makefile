# Two commands on a fresh machine:
#   make demo   create .venv, install, fetch the Shakespeare corpus, run `gptlab pipeline` (about 20 min on 2 CPU cores)
#   make test   install the dev extras and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `pip install torch==2.13.0` takes the CPU wheel already on our machines; other spellings pull CUDA builds.
TORCH  ?= torch==2.13.0

.PHONY: demo test install dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

# The whole story on the embedded default config: tokenizer → prepare → pretrain → evaluate → SFT → reward
# model → PPO → compress → evaluate → chat samples, with runs/pipeline/report/report.md. Re-running skips
# finished stages and resumes an interrupted one.
demo: $(VENV)/.installed
	$(BIN)/gptlab pipeline --out runs/pipeline

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/train_shakespeare_char.py
	$(BIN)/python benchmarks/train_step.py --preset gpt2

clean:
	rm -rf $(VENV) runs data *.egg-info
