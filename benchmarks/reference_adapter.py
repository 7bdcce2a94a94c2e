"""The PyTorch reference CTM's train step, for `model_bench.py --reference=DIR`.

DIR is a local checkout of github.com/SakanaAI/continuous-thought-machines.
Nothing of the reference is part of this project: its `models/ctm.py`
(ContinuousThoughtMachine) and `utils/losses.py` are imported from DIR at run
time. `ReferenceTrainStep` builds the reference model from one of
`model_bench.CONFIGS` (our config keys are the reference constructor's argument
names), feeds it the same batch as ours (NHWC images transposed to NCHW) and
runs the reference training scripts' step: zero_grad, forward, task loss,
backward, torch.optim.AdamW step.
"""

import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Our model options that the reference constructor lacks (compute options).
JAX_ONLY_KEYS = ('dtype', 'remat', 'unroll')
# optax.adamw's defaults, which model_bench's optimizer uses (torch's default
# weight decay is 1e-2).
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)


def _inside(path, directory):
  """Whether file `path` lies under `directory`."""
  if not path:
    return False
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


class Reference:
  """The reference's torch, ContinuousThoughtMachine and losses module, from DIR."""

  def __init__(self, ref_dir):
    self.dir = os.path.abspath(ref_dir)
    if not os.path.isfile(os.path.join(self.dir, 'models', 'ctm.py')):
      raise FileNotFoundError(
          f'--reference={ref_dir}: no models/ctm.py there; expected a checkout of '
          'github.com/SakanaAI/continuous-thought-machines'
      )
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          '--reference needs PyTorch, which is not installed: pip install torch '
          '(the CPU wheel is enough: --index-url https://download.pytorch.org/whl/cpu)'
      ) from e
    # The reference imports its own top-level `models` and `utils` packages.
    for name in ('models', 'utils'):
      loaded = sys.modules.get(name)
      if loaded is not None and not _inside(getattr(loaded, '__file__', None), self.dir):
        raise ImportError(
            f'a module named {name!r} is already imported from {loaded.__file__}; it would '
            f'shadow the reference package {os.path.join(self.dir, name)}'
        )
    sys.path.insert(0, self.dir)
    try:
      from models import ctm as ref_ctm  # pylint: disable=g-import-not-at-top
      from utils import losses as ref_losses  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'importing the reference from {self.dir} failed: {e}. It needs the packages '
          'that models/ctm.py and utils/losses.py import (torch, numpy); install the '
          'missing one named above.'
      ) from e
    for module in (ref_ctm, ref_losses):
      if not _inside(module.__file__, self.dir):
        raise ImportError(f'{module.__name__} came from {module.__file__}, not from {self.dir}')
    self.torch = torch
    # All the cores this process may use (XLA's CPU backend uses them all too).
    self.threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    self.threads = self.threads or os.cpu_count() or 1
    torch.set_num_threads(self.threads)
    self.model_cls = ref_ctm.ContinuousThoughtMachine
    self.losses = ref_losses

  def info(self):
    return dict(
        dir=self.dir,
        commit=self.commit(),
        torch=self.torch.__version__,
        torch_threads=self.torch.get_num_threads(),
        device='cpu',
        optimizer=f'torch.optim.AdamW{ADAMW}',
    )

  def commit(self):
    """DIR's git commit, or 'unknown' where DIR is not the top of a git checkout."""
    git = lambda *a: subprocess.run(
        ['git', '-C', self.dir, *a], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
      if os.path.realpath(git('rev-parse', '--show-toplevel')) != os.path.realpath(self.dir):
        return 'unknown'
      return git('rev-parse', '--short', 'HEAD') + (
          '-dirty' if git('status', '--porcelain') else ''
      )
    except (OSError, subprocess.CalledProcessError):
      return 'unknown'

  def model_kwargs(self, model_cfg):
    """Our model config as the reference constructor's keyword arguments."""
    params = inspect.signature(self.model_cls.__init__).parameters
    kwargs = {k: v for k, v in model_cfg.items() if k not in JAX_ONLY_KEYS}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      raise TypeError(f'the reference ContinuousThoughtMachine takes no {unknown}')
    missing = sorted(
        n
        for n, p in params.items()
        if n != 'self' and p.default is inspect.Parameter.empty and n not in kwargs
    )
    if missing:
      raise TypeError(f'our config lacks the reference arguments {missing}')
    # The reference builds shapes with `[B] + prediction_reshaper`: a list.
    kwargs['prediction_reshaper'] = list(kwargs['prediction_reshaper'])
    return kwargs


class ReferenceTrainStep:
  """One reference model + AdamW on a fixed batch; `step()` runs a train step."""

  def __init__(self, ref, cfg, x, targets, seed=0):
    """`cfg` is a model_bench.CONFIGS entry; x, targets as from make_batch."""
    torch = ref.torch
    self.ref, self.task = ref, cfg['task']
    x = np.array(x, np.float32)  # A writable copy, as torch.from_numpy wants.
    if x.ndim == 4:  # Images: ours NHWC, the reference's NCHW.
      x = x.transpose(0, 3, 1, 2)
    self.x = torch.from_numpy(np.ascontiguousarray(x))
    self.targets = torch.from_numpy(np.asarray(targets).astype(np.int64))
    self.kwargs = ref.model_kwargs(cfg['model'])
    torch.manual_seed(seed)
    np.random.seed(seed)  # The reference draws its neuron indices with np.random.
    # The reference prints (synch sizes, neuron select type) on stdout: keep it
    # off the table there.
    with contextlib.redirect_stdout(sys.stderr):
      self.model = ref.model_cls(**self.kwargs)
    self.model.train()
    with torch.no_grad():  # Materialise the lazy modules before the optimizer.
      self.model(self.x)
    self.n_params = sum(p.numel() for p in self.model.parameters())
    self.optimizer = torch.optim.AdamW(self.model.parameters(), **ADAMW)
    self.losses = []

  def loss(self, predictions, certainties):
    """The reference training scripts' loss for the task."""
    losses, targets = self.ref.losses, self.targets
    if self.task == 'parity':  # tasks/parity/train.py
      predictions = predictions.reshape(predictions.size(0), -1, 2, predictions.size(-1))
      return losses.parity_loss(predictions, certainties, targets, use_most_certain=True)[0]
    if self.task == 'image_classification':  # tasks/image_classification/train.py
      return losses.image_classification_loss(
          predictions, certainties, targets, use_most_certain=True
      )[0]
    # tasks/mazes/train.py
    predictions = predictions.reshape(predictions.size(0), -1, 5, predictions.size(-1))
    return losses.maze_loss(
        predictions, certainties, targets, cirriculum_lookahead=5, use_most_certain=True
    )[0]

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    predictions, certainties, _ = self.model(self.x)
    loss = self.loss(predictions, certainties)
    loss.backward()
    self.optimizer.step()
    self.losses.append(float(loss.detach()))
    return self.losses[-1]


class ReferenceProcess:
  """A `ReferenceTrainStep` in a worker process; `step()` runs one train step there.

  Torch and XLA then keep their own heaps and thread pools: run in one
  process, the reference's steps slowed ours by up to 1.8x (parity, batch 64).
  `env` is the worker's environment (model_bench passes the user's, without
  the huge-page tunable ctm_jax/hostmem.py adds for our side: with it the
  reference's steps were slower, CIFAR-10 b32 1.9 -> 2.4 s on a 2-core VM).
  `times` holds the worker's own wall time of each step.
  """

  def __init__(self, ref_dir, cfg, x, targets, env=None):
    self._tmp = tempfile.TemporaryDirectory()
    batch = os.path.join(self._tmp.name, 'batch.npz')
    np.savez(batch, x=np.asarray(x), targets=np.asarray(targets))
    with open(os.path.join(self._tmp.name, 'cfg.json'), 'w') as f:
      json.dump(cfg, f)
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), ref_dir, self._tmp.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    ready = self._read()
    self.n_params, self.kwargs = ready['n_params'], ready['kwargs']
    self.losses, self.times = [], []

  def _read(self):
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the reference worker exited with {self._proc.wait()}; see stderr')
    return json.loads(line)

  def step(self):
    self._proc.stdin.write('step\n')
    self._proc.stdin.flush()
    reply = self._read()
    self.losses.append(reply['loss'])
    self.times.append(reply['time_s'])
    return reply['loss']

  def close(self):
    self._proc.stdin.close()
    self._proc.wait()
    self._tmp.cleanup()


def _serve(ref_dir, tmp):
  """Worker: builds the step from tmp/{cfg.json,batch.npz}; one step per stdin line."""
  with open(os.path.join(tmp, 'cfg.json')) as f:
    cfg = json.load(f)
  batch = np.load(os.path.join(tmp, 'batch.npz'))
  # Replies go to the real stdout; anything the reference prints goes to stderr.
  out, sys.stdout = sys.stdout, sys.stderr
  step = ReferenceTrainStep(Reference(ref_dir), cfg, batch['x'], batch['targets'])
  print(json.dumps(dict(n_params=step.n_params, kwargs=step.kwargs)), file=out, flush=True)
  for _ in sys.stdin:
    t0 = time.perf_counter()
    loss = step.step()
    print(json.dumps(dict(loss=loss, time_s=time.perf_counter() - t0)), file=out, flush=True)


if __name__ == '__main__':
  _serve(*sys.argv[1:3])
