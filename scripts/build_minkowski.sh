#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 CPU-only from its PyPI sdist and cache the wheel.
# Usage: scripts/build_minkowski.sh [PYTHON] [CACHE_DIR]
# Idempotent: an importable install is left alone, a cached wheel is installed in seconds, and a
# wheel only enters the cache after it has been installed and imported successfully.
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${2:-${ME_WHEEL_CACHE:-$HOME/.cache/harness/wheels}}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

me_ok() { "$PY" -c 'import MinkowskiEngine as ME, sys; sys.exit(ME.__version__ != "0.5.4")' >/dev/null 2>&1; }

if me_ok; then
  echo "minkowski: MinkowskiEngine 0.5.4 already importable, nothing to do"
  exit 0
fi

tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls "$CACHE"/MinkowskiEngine-0.5.4-"$tag"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
  if me_ok; then
    echo "minkowski: MinkowskiEngine 0.5.4 installed from cached $wheel"
    exit 0
  fi
  echo "minkowski: cached wheel $wheel does not import; removing it and rebuilding"
  rm -f "$wheel"
fi

if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  echo "minkowski: installing libopenblas-dev (needs root)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q libopenblas-dev >/dev/null; else sudo apt-get install -y -q libopenblas-dev >/dev/null; fi
fi

work=$(mktemp -d)
# ME's setup.py needs setuptools APIs removed in 65; torch wants >= 77, so the user's version is
# restored on every exit path.
old_st=$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo "")
cleanup() {
  if [ -n "$old_st" ]; then "$PY" -m pip install -q "setuptools==$old_st" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$PY" -m pip install -q "setuptools<65" wheel
(cd "$work" && "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: MinkowskiEngine==0.5.4)
tar -xzf "$work"/MinkowskiEngine-0.5.4.tar.gz -C "$work"
src="$work/MinkowskiEngine-0.5.4"

# Python 3.10 removed the collections aliases of the abstract base classes. The combined import in
# MinkowskiKernelGenerator.py is split first (namedtuple stays in collections), then every plain
# `from collections import Sequence` moves to collections.abc.
sed -i -E 's/^from collections import (Sequence, namedtuple|namedtuple, Sequence)$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
  "$src/MinkowskiEngine/MinkowskiKernelGenerator.py"
for f in $(grep -rl "^from collections import Sequence$" "$src" --include=*.py || true); do
  sed -i 's/^from collections import Sequence$/from collections.abc import Sequence/' "$f"
done
if grep -rqE "^from collections import .*Sequence|^from collections\.abc import .*namedtuple" "$src" --include=*.py; then
  echo "minkowski: could not patch the collections imports"; exit 1
fi

echo "minkowski: compiling (about 5 minutes on 2 cores)"
(cd "$src" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q bdist_wheel --blas=openblas >"$work/build.log" 2>&1) || {
  tail -n 40 "$work/build.log"; echo "minkowski: build failed, log above"; exit 1; }
built=$(ls "$src"/dist/MinkowskiEngine-0.5.4-*.whl | head -n1)
"$PY" -m pip install -q --no-deps --force-reinstall "$built"
if ! me_ok; then
  "$PY" -c 'import MinkowskiEngine' || true
  echo "minkowski: the freshly built wheel does not import; not caching it"; exit 1
fi
cp "$built" "$CACHE"/
echo "minkowski: MinkowskiEngine 0.5.4 built, installed and cached as $CACHE/$(basename "$built")"
