# Entry points of the harness. `make setup && make table1` and `make setup && make test`
# work on a fresh machine (see README.md).
PY ?= .venv/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup test table1 bench minkowski

# A virtual environment with the CPU build of torch pinned (a looser pin pulls a CUDA build).
setup: .venv/.setup-done
.venv/.setup-done: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest tests

# Table 1 on the embedded miniature datasets (generated on first use); a second run reuses the
# stored results. Extra arguments: make table1 ARGS="seeds=[0,1]"
table1: setup
	$(PY) -m harness sweep configs/sweeps/table1.yaml $(ARGS)

# Benchmarks, each writing its figures under reports/bench/.
bench: setup
	$(PY) -m bench.pairs

# Optional: MinkowskiEngine 0.5.4, CPU-only, built once from its sdist and cached.
minkowski: setup
	scripts/build_minkowski.sh $(PY)

# A local one-node SLURM cluster (Debian slurm-wlm + munge) for the SLURM tests
# (tests/test_slurm_cluster.py) and for trying sweeps locally; needs root.
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: slurm-up slurm-down slurm-status
slurm-up:
	$(SUDO) scripts/slurm_local.sh up

slurm-down:
	$(SUDO) scripts/slurm_local.sh down

slurm-status:
	scripts/slurm_local.sh status
