# Entry points of the harness. `make setup && make table1` and `make setup && make test`
# work on a fresh machine (see README.md).
PY ?= .venv/bin/python
TORCH_VERSION ?= 2.13.0
# Where pip finds torch: empty = the configured index. Where that index serves the CUDA build
# for this pin (plain PyPI on Linux does), TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX ?=

.PHONY: help setup test table1 report bench minkowski

help:  ## this list (a bare `make` prints it)
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

# A virtual environment with the CPU build of torch pinned (a looser pin pulls a CUDA build).
setup: .venv/.setup-done  ## .venv with CPU torch and the harness (make setup TORCH_INDEX=... elsewhere)
.venv/.setup-done: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup  ## the test suite (README's test command)
	$(PY) -m pytest tests

# Table 1 on the embedded miniature datasets (generated on first use); a second run reuses the
# stored results. Extra arguments: make table1 ARGS="seeds=[0,1]"
# Writes runs/table1/report/: table1.md/.csv/.tex/.html and the plots (deltas, training curves).
table1: setup  ## Table 1 on the embedded miniature datasets (ARGS="seeds=[0,1,2]")
	$(PY) -m harness sweep configs/sweeps/table1.yaml $(ARGS)

# The report of the embedded run again (partial runs too), e.g. make report ARGS="--compare published"
report: setup  ## the report of runs/table1 again (ARGS="--compare published")
	$(PY) -m harness report runs/table1 $(ARGS)

# Benchmarks (not tests), each writing its figures under reports/bench/: the backbone
# (Res16UNet34C fwd+bwd, torch backend vs MinkowskiEngine when installed, 2 threads;
# BENCH_ARGS adds options, e.g. BENCH_ARGS="--sizes 20000 --repeats 2"), the ops a step issues
# in the GPU's scheme (counted on any machine), where a CPU step's time goes against its floor,
# and frame-pair mining. Where real ScanNet meshes are at hand ($HARNESS_SAMPLES/scannet, default
# ../shared/samples/scannet) the backbone and the CPU floor also run on them (*-scannet.md).
SCANNET_SAMPLES ?= $(or $(HARNESS_SAMPLES),../shared/samples)/scannet
# OpenBLAS (numpy's, whose products the torch backend uses where they beat torch's MKL, and
# MinkowskiEngine's) picks its kernels for the CPU by itself unless OPENBLAS_CORETYPE names a
# core; this project's VMs export OPENBLAS_CORETYPE=Haswell, which holds both backends to AVX2
# kernels on an AVX-512 CPU. The benchmark unsets it for both (BENCH_UNSET= keeps it).
BENCH_UNSET ?= OPENBLAS_CORETYPE
BENCH_PY = $(if $(BENCH_UNSET),env $(addprefix -u ,$(BENCH_UNSET)) )$(PY)
bench: setup  ## benchmarks into reports/bench/ (not tests; BENCH_ARGS=...; BENCH_UNSET= keeps OPENBLAS_CORETYPE)
	$(BENCH_PY) bench/backbone.py --threads 2 --out reports/bench/backbone.md $(BENCH_ARGS)
	$(BENCH_PY) -m bench.launches --out reports/bench/launches.md
	$(BENCH_PY) -m bench.cpu_floor --threads 2 --repeats 5 --out reports/bench/cpu-floor.md
	if [ -d "$(SCANNET_SAMPLES)/scans" ]; then \
	  $(BENCH_PY) bench/backbone.py --threads 2 --input scannet --scannet-root "$(SCANNET_SAMPLES)" \
	    --out reports/bench/backbone-scannet.md $(BENCH_ARGS) && \
	  $(BENCH_PY) -m bench.cpu_floor --threads 2 --repeats 5 --input scannet --scannet-root "$(SCANNET_SAMPLES)" \
	    --out reports/bench/cpu-floor-scannet.md; \
	else echo "no ScanNet meshes under $(SCANNET_SAMPLES)/scans: the real-scan benchmark is skipped"; fi
	$(BENCH_PY) -m bench.pairs

# Optional: MinkowskiEngine 0.5.4, CPU-only, built once from its sdist and cached
# (~/.cache/harness/wheels; ME_WHEEL_CACHE overrides). A second run installs the cached wheel
# in seconds, and does nothing when ME already imports.
minkowski: setup  ## MinkowskiEngine 0.5.4 CPU-only, built once and cached
	scripts/build_minkowski.sh $(PY)

# A local one-node SLURM cluster (Debian slurm-wlm + munge) for the SLURM tests
# (tests/test_slurm_cluster.py) and for trying sweeps locally; needs root.
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: slurm-up slurm-down slurm-status
slurm-up:  ## a local one-node SLURM cluster (root)
	$(SUDO) scripts/slurm_local.sh up

slurm-down:  ## stop it
	$(SUDO) scripts/slurm_local.sh down

slurm-status:  ## its state
	scripts/slurm_local.sh status
