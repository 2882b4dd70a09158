# Two commands on a fresh machine:
#   make demo   create .venv, install, fetch the Shakespeare corpus, train a small GPT on the CPU, sample
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

data/shakespeare/meta.json: | $(VENV)/.installed
	$(BIN)/gptlab prepare shakespeare --out data/shakespeare --tokenizer bpe:4000

demo: $(VENV)/.installed data/shakespeare/meta.json
	rm -rf runs/demo
	$(BIN)/gptlab pretrain --config configs/demo.yaml
	$(BIN)/gptlab sample runs/demo --prompt "ROMEO." --max-new-tokens 120 --num-samples 2 --temperature 0.8

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/train_shakespeare_char.py
	$(BIN)/python benchmarks/train_step.py --preset gpt2

clean:
	rm -rf $(VENV) runs data *.egg-info
