#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 CPU-only from its PyPI sdist and cache the wheel.
# Usage: scripts/build_minkowski.sh [PYTHON] [CACHE_DIR]
# The second run finds the cached wheel and installs it in seconds.
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${2:-${ME_WHEEL_CACHE:-$HOME/.cache/harness/wheels}}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls "$CACHE"/MinkowskiEngine-0.5.4-"$tag"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
    echo "minkowski: installing libopenblas-dev (needs root)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q libopenblas-dev >/dev/null; else sudo apt-get install -y -q libopenblas-dev >/dev/null; fi
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # ME's setup.py imports setuptools APIs removed in 65; restore the user's version afterwards.
  old_st=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo "")
  "$PY" -m pip install -q "setuptools<65" wheel
  (cd "$work" && "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: MinkowskiEngine==0.5.4)
  tar -xzf "$work"/MinkowskiEngine-0.5.4.tar.gz -C "$work"
  src="$work/MinkowskiEngine-0.5.4"
  # Python 3.10 removed the collections aliases of the abstract base classes.
  grep -rl "from collections import Sequence" "$src" --include=*.py | while read -r f; do
    sed -i 's/from collections import Sequence/from collections.abc import Sequence/' "$f"
  done
  sed -i 's/from collections import namedtuple, Sequence/from collections import namedtuple\nfrom collections.abc import Sequence/' \
    "$src/MinkowskiEngine/MinkowskiKernelGenerator.py"
  echo "minkowski: compiling (about 5 minutes on 2 cores)"
  (cd "$src" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q bdist_wheel --blas=openblas >"$work/build.log" 2>&1) || {
    tail -n 40 "$work/build.log"; echo "minkowski: build failed, log above"; exit 1; }
  cp "$src"/dist/MinkowskiEngine-*.whl "$CACHE"/
  wheel=$(ls "$CACHE"/MinkowskiEngine-0.5.4-"$tag"-*.whl | head -n1)
  if [ -n "$old_st" ]; then "$PY" -m pip install -q "setuptools==$old_st"; fi
fi
"$PY" -m pip install -q --no-deps "$wheel"
"$PY" -c 'import MinkowskiEngine as ME; print("minkowski: MinkowskiEngine", ME.__version__, "installed from", "'"$wheel"'")'
