"""The device's achievable matmul throughput, measured: the '% matmul peak' reference.

Times a jitted square `a @ b` (N x N by N x N, 2 N^3 FLOPs) at a few sizes, at
JAX's default matmul precision (the one the model's layers run at), and keeps
the best size. Per size: one warm-up call (which also compiles), then the
median over `repeats` samples; a sample dispatches enough back-to-back calls to
last `min_sample_s` (so dispatch overhead does not count on fast devices) and
blocks on the last one.

Usage (from the repo root; `model_bench.py` calls `measure` itself):
  python -m benchmarks.matmul_peak --dtype=bfloat16 --sizes=4096,8192 --json=/tmp/peak.json

Dimension glossary: N matrix side.
"""

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp

# A CPU reaches its peak well below 4096; accelerators need larger matrices.
CPU_SIZES = (1024, 2048, 4096)
ACCELERATOR_SIZES = (4096, 8192)


def default_sizes(platform=None):
  platform = platform or jax.devices()[0].platform
  return CPU_SIZES if platform == 'cpu' else ACCELERATOR_SIZES


def measure(dtype='float32', sizes=None, repeats=5, min_sample_s=0.05):
  """dict(dtype, sizes=[per-size results], best_n, peak_flops_per_s)."""
  sizes = tuple(sizes or default_sizes())
  matmul = jax.jit(jnp.matmul)
  per_size = []
  for n in sizes:
    key_a, key_b = jax.random.split(jax.random.key(n))
    a_NxN = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b_NxN = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    jax.block_until_ready(matmul(a_NxN, b_NxN))  # compile and warm up
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a_NxN, b_NxN))
    calls = max(1, min(100, math.ceil(min_sample_s / (time.perf_counter() - t0))))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(calls):
        # Only the last result is kept: the device runs calls in order.
        c_NxN = matmul(a_NxN, b_NxN)
      jax.block_until_ready(c_NxN)
      times.append((time.perf_counter() - t0) / calls)
    median_s = statistics.median(times)
    per_size.append(
        dict(n=n, calls_per_sample=calls, median_s=median_s, flops_per_s=2.0 * n**3 / median_s)
    )
    del a_NxN, b_NxN, c_NxN
  best = max(per_size, key=lambda r: r['flops_per_s'])
  return dict(
      dtype=jnp.dtype(dtype).name,
      precision='default',
      repeats=repeats,
      sizes=per_size,
      best_n=best['n'],
      peak_flops_per_s=best['flops_per_s'],
  )


def describe(peak):
  """One line for a table header."""
  return (
      f"{peak['dtype']} {peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
      f"(N={peak['best_n']} square a @ b of N in {[s['n'] for s in peak['sizes']]}, "
      f"median of {peak['repeats']} samples after a warm-up call)"
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--sizes', default='', help='comma-separated N; default: by platform')
  p.add_argument('--repeats', type=int, default=5, help='timed samples per size')
  p.add_argument('--json', default=None, help='write the result (and the device) here')
  args = p.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(',') if s] or None
  peak = measure(args.dtype, sizes, args.repeats)
  device = jax.devices()[0]
  peak.update(device_kind=device.device_kind, platform=device.platform)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(peak, f, indent=1)
  print(f'{device.device_kind}: {describe(peak)}')


if __name__ == '__main__':
  main()
