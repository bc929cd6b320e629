"""Benchmark harness for self-supervised pre-training of 3D point-cloud networks."""

__version__ = "0.1.0"
