"""Benchmark harness for self-supervised pre-training of 3D point-cloud networks."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# The torch backend runs its sparse convolutions on its own worker threads
# (harness.backbones.workers). By default GNU OpenMP keeps the threads of torch's intra-op
# pool spinning for milliseconds after every parallel op (a batch norm, a ReLU), on the very
# cores those workers need: at 100k voxels on 2 cores that cost about 10% of a training step.
# Waiting passively costs a wake-up of microseconds instead. OpenMP reads the setting once,
# when torch loads, so this takes effect where harness is imported first (the CLI, SLURM jobs,
# the benchmark); an explicit OMP_WAIT_POLICY wins.
TORCH_LOADED_FIRST = "torch" in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The same for OpenBLAS (numpy's, and the one MinkowskiEngine links): after each call its
# threads spin on sched_yield for 2^28 cycles (~0.1 s) by default. MinkowskiEngine makes one
# BLAS call per kernel offset, so at 100k voxels on 2 cores its step spent ~6 s in the kernel
# and took 9-10.5 s; with 2^4 cycles it takes 7.3-8.5 s. The torch backend's kernel maps make a
# few numpy products per step (about 2% faster). Read when each OpenBLAS loads; an explicit
# setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# Under bf16 autocast on the CPU every GEMM is a oneDNN primitive, compiled once per shape and
# kept in a cache of 1024 by default. A sparse step has a few thousand shapes (rows per kernel
# offset and chunk, columns per bucket), so the default cache thrashes and recompiles all the
# time: at 100k voxels a bf16 step took 4.3 s with it and 2.7 s with 4096 (the cache costs about
# 0.4 GB more resident memory there; fp32 GEMMs do not use it). oneDNN reads the variable when it
# first builds a primitive; an explicit setting wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
