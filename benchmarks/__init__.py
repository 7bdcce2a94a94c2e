"""Benchmarks: speed, memory, data, RL, serving and export tables (see each
module's docstring; their shared parts are `harness`). Run from the repository
root as `python -m benchmarks.<name>`."""
