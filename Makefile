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

# Optional: MinkowskiEngine 0.5.4, CPU-only, built once from its sdist and cached
# (~/.cache/harness/wheels; ME_WHEEL_CACHE overrides). A second run installs the cached wheel
# in seconds, and does nothing when ME already imports.
minkowski: setup
	scripts/build_minkowski.sh $(PY)

# Backbone benchmark (not a test): Res16UNet34C fwd+bwd, torch backend vs MinkowskiEngine when
# installed, 2 threads; writes reports/bench/backbone.md (and .json). BENCH_ARGS adds options,
# e.g. BENCH_ARGS="--sizes 20000 --repeats 2".
bench: setup
	$(PY) bench/backbone.py --threads 2 --out reports/bench/backbone.md $(BENCH_ARGS)
