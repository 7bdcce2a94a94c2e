"""The benchmarks' harness: what every benchmark builds, compiles, times and
records with, so that their numbers are taken the same way.

  build(config)              the trainer's own setup of a config on one device
                             (ctm_jax/supervised.py), its synthetic batches
  aot_compile(fn, *args)     lower + compile, each timed
  donated_steps(...)         train steps from the last state, state donated
  time_calls / time_interleaved   wall times after warm-up, interleaved A/B rounds
  memory_analysis_of / device_peak_bytes   XLA's and the device's memory
  environment / git_commit / cpu_model     what the JSON records beside a table
  write_json / log / run_child / accelerator_present

Benchmarks are a package: run them from the repository root as
`python -m benchmarks.<name>`.

Dimension glossary: B batch.
"""

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax
import jax
import optax

from ctm_jax import hostmem
from ctm_jax import supervised
from ctm_jax import validation
from ctm_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seed of the synthetic batch every step runs on.
BATCH_SEED = 0


@dataclasses.dataclass(frozen=True)
class Bench:
  """A config's task, model and the trainer's jitted pieces on a 1-device mesh."""

  config: Any
  task: Any
  model: Any
  mesh: jax.sharding.Mesh
  run: supervised.Setup  # run.train_step is the trainer's step, run.init its fresh state


def build(config) -> Bench:
  """The trainer's setup of `config` on the first device, as train_and_evaluate builds it.

  Lower and run its functions inside `with jax.set_mesh(bench.mesh)`, as the
  trainer does.
  """
  task = validation.validate(config, num_devices=1)
  model = task.make_model(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    run = supervised.setup(config, model, task, mesh)
  return Bench(config=config, task=task, model=model, mesh=mesh, run=run)


def train_step(bench):
  """The step the benchmark times: the trainer's own, jitted with the state donated.

  (state, global batch) -> (state, metrics): the config's optimiser (clipping,
  AdamW, LR schedule, weight-decay mask), the finite guard, the decay
  projection and the task's loss and train metrics (ctm_jax/steps.py).
  """
  return bench.run.train_step


def local_batch(bench, seed=BATCH_SEED) -> dict:
  """The task's synthetic batch of the config's batch size (numpy, on the host)."""
  return bench.task.synthetic_batch(bench.config, bench.config.batch_size, seed)


def device_batch(bench, seed=BATCH_SEED) -> dict:
  """`local_batch` on the train step's batch sharding."""
  return jax.device_put(local_batch(bench, seed), bench.run.batch_sharding)


def batch_shapes(bench) -> dict:
  """ShapeDtypeStructs of `device_batch` (with its sharding), for lowering from shapes."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bench.run.batch_sharding),
      local_batch(bench),
  )



def aot_compile(fn, *args):
  """(compiled, lower_s, compile_s) for an already-jitted `fn`."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def donated_steps(compiled, state, batch):
  """A call running one train step of `compiled` (its state donated) on `batch`
  from the last step's state, blocked until ready; returns the step's metrics.
  It owns `state` from here on."""
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
    return metrics

  return step


def time_calls(call, warmup, repeats):
  """Wall times (s) of `repeats` calls after `warmup` calls; `call()` must block."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def time_interleaved(calls, warmup, repeats, untimed_first=False):
  """Per call, wall times (s) of `repeats` rounds after `warmup` rounds.

  A round runs every call once, the order reversed every other round, so that
  machine noise (other processes, clocks) hits all of them alike. With
  `untimed_first`, each turn runs its call twice and times the second: the
  first absorbs the cost of switching from the other call (on this project's
  VM the first step after the other process's step ran up to 1.9x slower for
  ours, about 1.06x for the reference), which a training loop, running steps
  back to back, never pays.
  """
  times = [[] for _ in calls]
  for i in range(warmup + repeats):
    order = list(range(len(calls)))[:: -1 if i % 2 else 1]
    for j in order:
      if untimed_first:
        calls[j]()
      t0 = time.perf_counter()
      calls[j]()
      if i >= warmup:
        times[j].append(time.perf_counter() - t0)
  return times


def memory_analysis_of(compiled):
  try:
    mem = compiled.memory_analysis()
  except Exception:
    return None
  if mem is None:
    return None
  fields = (
      'temp_size_in_bytes',
      'argument_size_in_bytes',
      'output_size_in_bytes',
      'alias_size_in_bytes',
      'generated_code_size_in_bytes',
  )
  out = {f: int(getattr(mem, f, 0) or 0) for f in fields}
  out['total_bytes'] = (
      out['temp_size_in_bytes']
      + out['argument_size_in_bytes']
      + out['output_size_in_bytes']
      - out['alias_size_in_bytes']
  )
  return out


def device_peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)



def run_child(module, flags):
  """Runs benchmark `module` (e.g. 'benchmarks.matmul_peak') with `flags` + --json in a
  fresh process; its JSON, or None if it failed."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, '-m', module, *flags, f'--json={path}']
    # The child's table goes to our stderr: only this process's table is on stdout.
    proc = subprocess.run(cmd, stdout=sys.stderr, cwd=REPO, check=False)
    if proc.returncode or not os.path.exists(path):
      log(f'subprocess {" ".join(cmd[1:])} exited with {proc.returncode}')
      return None
    with open(path) as f:
      return json.load(f)



def accelerator_present():
  """Whether JAX's default backend is a GPU/TPU, asked of a throwaway process.

  This process then never initialises the device: a TPU admits one process at
  a time, and a GPU process would preallocate most of the memory its
  subprocesses need.
  """
  env = {**os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.harness', 'backend'],
      capture_output=True, text=True, env=env, cwd=REPO, check=False,
  )
  lines = proc.stdout.split()
  return bool(lines) and lines[-1] in ('gpu', 'cuda', 'rocm', 'tpu')



def git_commit():
  """This checkout's short commit, '-dirty' when tracked files changed; 'unknown' outside git."""
  try:
    sha = subprocess.run(
        ['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ['git', '-C', REPO, 'status', '--porcelain', '--untracked-files=no'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return sha + ('-dirty' if dirty else '')


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown'


def environment():
  """The machine and software a table was measured on, for its JSON."""
  device = jax.devices()[0]
  return dict(
      cpu=cpu_model(),
      cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      device_kind=device.device_kind,
      platform=device.platform,
      device_count=jax.device_count(),
      cpu_count=os.cpu_count(),
      jax=jax.__version__,
      jaxlib=getattr(jax.lib, '__version__', None) or _jaxlib_version(),
      flax=flax.__version__,
      optax=optax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      git_commit=git_commit(),
      host_allocator=hostmem.status(),
  )


def _jaxlib_version():
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top

    return jaxlib.__version__
  except ImportError:
    return None



def write_json(path, env, args, **payload):
  with open(path, 'w') as f:
    json.dump(dict(environment=env, args=dict(vars(args)), **payload), f, indent=1)


if __name__ == '__main__':
  if sys.argv[1:] == ['backend']:  # accelerator_present's throwaway process
    print(jax.default_backend())
  else:
    sys.exit('usage: python -m benchmarks.harness backend')
