# Two commands on a fresh machine:
#   make demo   create .venv, install, fetch the Shakespeare corpus, run `gptlab pipeline` (6-10 min on 2 CPU cores)
#   make test   install the dev extras and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `pip install torch==2.13.0` takes the CPU wheel already on our machines; other spellings pull CUDA builds.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-avx2 install dev bench bench-omni clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[plots]"
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

# The dtype / packing / generation / compression / training / LoRA tests again, as on an AVX2-only CPU without
# native bf16, whatever this CPU is: oneDNN, ATen and MKL limited to AVX2 kernels, GPTLAB_CPU_BF16=0, and
# a separate inductor cache (its compiled kernels do not record the ISA limit).
AVX2_TESTS := tests/test_runtime.py tests/test_stage.py tests/test_generate.py tests/test_compress_layers.py tests/test_compress_runs.py \
              tests/test_train.py tests/test_serve_engine.py tests/test_lora.py
test-avx2: $(VENV)/.dev
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 GPTLAB_CPU_BF16=0 \
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(BIN)/python -m pytest -q $(AVX2_TESTS)

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/train_shakespeare_char.py
	$(BIN)/python benchmarks/train_step.py --preset gpt2

bench-omni: $(VENV)/.dev
	$(BIN)/python benchmarks/omni.py --out runs/omni-bench

clean:
	rm -rf $(VENV) runs data *.egg-info
