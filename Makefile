# Two commands do all the set-up on a fresh machine:
#   make train   build .venv (once), then run the main training job (torchrun, 2 ranks; NPROC=, ARGS=)
#   make test    build .venv (once), then run the test suite
# The environment is the pinned stack of shared/ENVIRONMENT.md; re-running is safe.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet

.PHONY: setup train test bench study iproute2
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
	$(PIP) torch==2.13.0
	$(PIP) deepspeed==0.19.8 pytest==8.4.2 matplotlib==3.11.2 transformers==5.24.0 accelerate==1.15.0
	# megatron-core declares python>=3.12 but ships a cp311 wheel; its deps would build numpy from source
	$(PIP) --no-deps --ignore-requires-python megatron-core==0.19.2
	$(PIP) triton==3.9.0
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# a real multi-rank job: 2 ranks (dp = 2, gloo on the CPU, one torch thread each on a 2-core box)
NPROC  ?= 2
train: $(STAMP)
	$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) launch/train.py $(ARGS)

test: $(STAMP) iproute2
	$(BIN)/python -m pytest -q $(ARGS)

# the two-node test (tests/test_multinode.py: network namespaces) needs root and iproute2's `ip`:
# installed here when absent and root; otherwise that test is skipped with the reason
iproute2:
	@command -v ip >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null || echo "make: could not install iproute2"; \
	  else echo "make: no iproute2 and not root (or no apt-get): the two-node test will be skipped"; fi; }

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py $(ARGS)

# the convergence and fine-tuning study (benchmarks/convergence.py; ARGS=--quick for the smoke scale)
study: $(STAMP)
	$(BIN)/python benchmarks/convergence.py $(ARGS)
