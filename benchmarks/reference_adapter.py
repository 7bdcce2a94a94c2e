"""The PyTorch reference CTM's train step, for `model_bench.py --reference=DIR`.

DIR is a local checkout of github.com/SakanaAI/continuous-thought-machines.
Nothing of the reference is part of this project: its `models/ctm.py`
(ContinuousThoughtMachine), `utils/losses.py` and `utils/schedulers.py` are
imported from DIR at run time. `ReferenceTrainStep` builds the reference model
from a benchmark spec (`model_bench.reference_spec`: the task name, our model's
constructor kwargs from `task.model_kwargs(config)`, whose keys are the
reference constructor's argument names, and the whole config, whose trainer
keys are the reference scripts' argparse names), feeds it the same batch as
ours (NHWC images transposed to NCHW) and runs its training script's step
(tasks/<task>/train.py) with the config's optimiser settings:

  zero_grad, forward, task loss, backward, gradient clipping, AdamW step,
  LR scheduler step.

The optimiser is built as the script builds it from its arguments: AdamW(lr,
eps 1e-8, weight_decay), with the script's parameter groups when
weight_decay_exclude is set; clipping when gradient_clipping != -1, by the
config's gradient_clipping_type as the scripts clip (the parity script wraps
AdamW in autoclip's QuantileClip(quantile, history_length=1000): `pip install
autoclip`, as the reference's requirements.txt lists it; the image and maze
scripts call torch.nn.utils.clip_grad_norm_ before the step); the scheduler
from use_scheduler/scheduler_type/warmup_steps/... (utils/schedulers.py).
The scripts' AMP (GradScaler) is off here: the reference runs in float32.
"""

import contextlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Options of our baselines' that every config carries and the CTM ignores:
# dropped where the reference constructor has no such argument.
IGNORED_BY_CTM = ('num_layers',)
# AdamW's eps in every training script (without AMP).
ADAMW_EPS = 1e-8
# autoclip's QuantileClip history in the parity script.
QUANTILE_HISTORY = 1000


def _import_package(name, directory):
  """Imports the package in `directory` as top-level `name` (the reference's
  `models` and `utils` import each other by those names), leaving sys.path alone."""
  if name in sys.modules:
    return sys.modules[name]
  init = os.path.join(directory, '__init__.py')
  if os.path.isfile(init):
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[directory]
    )
  else:  # a namespace package (the reference's models/ has no __init__.py)
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [directory]
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    if spec.loader is not None:
      spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


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
    for name in ('models', 'utils'):
      _import_package(name, os.path.join(self.dir, name))
    try:
      from models import ctm as ref_ctm  # pylint: disable=g-import-not-at-top
      from utils import losses as ref_losses  # pylint: disable=g-import-not-at-top
      from utils import schedulers as ref_schedulers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'importing the reference from {self.dir} failed: {e}. It needs the packages '
          'that models/ctm.py and utils/losses.py import (torch, numpy); install the '
          'missing one named above.'
      ) from e
    for module in (ref_ctm, ref_losses, ref_schedulers):
      if not _inside(module.__file__, self.dir):
        raise ImportError(f'{module.__name__} came from {module.__file__}, not from {self.dir}')
    self.torch = torch
    # All the cores this process may use (XLA's CPU backend uses them all too).
    self.threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
    self.threads = self.threads or os.cpu_count() or 1
    torch.set_num_threads(self.threads)
    self.model_cls = ref_ctm.ContinuousThoughtMachine
    self.losses = ref_losses
    self.schedulers = ref_schedulers

  def info(self):
    return dict(
        dir=self.dir,
        commit=self.commit(),
        torch=self.torch.__version__,
        torch_threads=self.torch.get_num_threads(),
        device='cpu',
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
    """Our model config (without our compute options: model_bench.reference_spec)
    as the reference constructor's keyword arguments."""
    params = inspect.signature(self.model_cls.__init__).parameters
    kwargs = {
        k: v
        for k, v in model_cfg.items()
        if k in params or k not in IGNORED_BY_CTM
    }
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


def describe_optimizer(args):
  """The training script's optimiser for config `args` (reference argparse names), in words."""
  groups = (
      f", no decay for {list(args['weight_decay_exclude'])}"
      if args.get('weight_decay_exclude') and args['weight_decay']
      else ''
  )
  text = f"AdamW(lr={args['lr']}, eps={ADAMW_EPS}, weight_decay={args['weight_decay']}{groups})"
  clip = args['gradient_clipping']
  if clip != -1:
    if args['gradient_clipping_type'] == 'quantile':
      text = f'autoclip QuantileClip(quantile={clip}, history_length={QUANTILE_HISTORY}) + ' + text
    else:
      text = f'clip_grad_norm_(max_norm={clip}) + ' + text
  if args['use_scheduler']:
    text += f", {args['scheduler_type']} schedule, warmup {args['warmup_steps']}"
  elif args['warmup_steps']:
    text += f", warmup {args['warmup_steps']}"
  return text


class ReferenceTrainStep:
  """One reference model + its script's optimiser on a fixed batch; `step()` runs a train step."""

  def __init__(self, ref, spec, batch, seed=0):
    """`spec` as from model_bench.reference_spec; `batch` our batch ('inputs', 'targets')."""
    torch = ref.torch
    self.ref, self.task, self.args = ref, spec['task'], spec['args']
    self.loss_name = spec['loss']
    x = np.array(batch['inputs'], np.float32)  # A writable copy, as torch.from_numpy wants.
    if x.ndim == 4:  # Images: ours NHWC, the reference's NCHW.
      x = x.transpose(0, 3, 1, 2)
    self.x = torch.from_numpy(np.ascontiguousarray(x))
    self.targets = torch.from_numpy(np.asarray(batch['targets']).astype(np.int64))
    self.kwargs = ref.model_kwargs(spec['model'])
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
    self.optimizer, self.clip_norm = self._optimizer()
    self.scheduler = self._scheduler()
    self.optimizer_text = describe_optimizer(self.args)
    self.losses = []

  def _optimizer(self):
    """(optimizer, max_norm or None) as the task's train.py builds them from its args."""
    torch, args = self.ref.torch, self.args
    exclude = list(args.get('weight_decay_exclude') or ())
    if exclude and args['weight_decay'] != 0:  # the image and maze scripts' parameter groups
      named = list(self.model.named_parameters())
      excluded = lambda name: any(s in name for s in exclude)
      decay = [p for n, p in named if not excluded(n)]
      params = [
          {'params': decay, 'weight_decay': args['weight_decay']},
          {'params': [p for n, p in named if excluded(n)], 'weight_decay': 0},
      ]
      optimizer = torch.optim.AdamW(params, lr=args['lr'], eps=ADAMW_EPS)
    else:
      optimizer = torch.optim.AdamW(
          self.model.parameters(), lr=args['lr'], eps=ADAMW_EPS, weight_decay=args['weight_decay']
      )
    clip = args['gradient_clipping']
    if clip == -1:
      return optimizer, None
    if args['gradient_clipping_type'] == 'norm':  # tasks/{image_classification,mazes}/train.py
      return optimizer, clip
    try:  # tasks/parity/train.py
      from autoclip.torch import QuantileClip  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "the config clips by quantile, as the reference's parity script does with autoclip's "
          'QuantileClip, which is not installed: pip install autoclip (or put it on PYTHONPATH)'
      ) from e
    return (
        QuantileClip.as_optimizer(
            optimizer=optimizer, quantile=clip, history_length=QUANTILE_HISTORY
        ),
        None,
    )

  def _scheduler(self):
    """The scripts' scheduler: warmup LambdaLR, or their multistep / cosine schedulers."""
    torch, args, schedulers = self.ref.torch, self.args, self.ref.schedulers
    if not args['use_scheduler']:
      return torch.optim.lr_scheduler.LambdaLR(
          self.optimizer, lr_lambda=schedulers.warmup(args['warmup_steps']).step
      )
    if args['scheduler_type'] == 'multistep':
      return schedulers.WarmupMultiStepLR(
          self.optimizer,
          warmup_steps=args['warmup_steps'],
          milestones=list(args['milestones']),
          gamma=args['gamma'],
      )
    return schedulers.WarmupCosineAnnealingLR(
        self.optimizer,
        args['warmup_steps'],
        args['training_iterations'],
        warmup_start_lr=1e-20,
        eta_min=1e-7,
    )

  def loss(self, predictions, certainties):
    """The training script's loss: the spec's function of the reference's utils/losses.py.

    As every script does, predictions (B, O, T) are first shaped (B,
    *prediction_reshaper, T); the loss's keyword arguments (use_most_certain,
    a curriculum lookahead, ...) come from the config keys of the same names,
    as the scripts pass their argparse values (the image and maze scripts fix
    use_most_certain=True, which every config here sets).
    """
    fn = getattr(self.ref.losses, self.loss_name, None)
    if fn is None:
      raise NotImplementedError(
          f'the reference has no utils/losses.py:{self.loss_name} for task {self.task!r}'
      )
    shaped = predictions.reshape(
        predictions.size(0), *self.kwargs['prediction_reshaper'], predictions.size(-1)
    )
    params = list(inspect.signature(fn).parameters.values())[3:]  # after preds, certs, targets
    options = {p.name: self.args[p.name] for p in params if p.name in self.args}
    return fn(shaped, certainties, self.targets, **options)[0]

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    predictions, certainties, _ = self.model(self.x)
    loss = self.loss(predictions, certainties)
    loss.backward()
    if self.clip_norm is not None:
      self.ref.torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()
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

  def __init__(self, ref_dir, spec, batch, env=None):
    self._tmp = tempfile.TemporaryDirectory()
    np.savez(
        os.path.join(self._tmp.name, 'batch.npz'), **{k: np.asarray(v) for k, v in batch.items()}
    )
    with open(os.path.join(self._tmp.name, 'spec.json'), 'w') as f:
      json.dump(spec, f)
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), ref_dir, self._tmp.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    ready = self._read()
    self.n_params, self.kwargs = ready['n_params'], ready['kwargs']
    self.optimizer_text = ready['optimizer']
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
  """Worker: builds the step from tmp/{spec.json,batch.npz}; one step per stdin line."""
  with open(os.path.join(tmp, 'spec.json')) as f:
    spec = json.load(f)
  batch = dict(np.load(os.path.join(tmp, 'batch.npz')))
  # Replies go to the real stdout; anything the reference prints goes to stderr.
  out, sys.stdout = sys.stdout, sys.stderr
  step = ReferenceTrainStep(Reference(ref_dir), spec, batch)
  print(
      json.dumps(dict(n_params=step.n_params, kwargs=step.kwargs, optimizer=step.optimizer_text)),
      file=out,
      flush=True,
  )
  for _ in sys.stdin:
    t0 = time.perf_counter()
    loss = step.step()
    print(json.dumps(dict(loss=loss, time_s=time.perf_counter() - t0)), file=out, flush=True)


if __name__ == '__main__':
  _serve(*sys.argv[1:3])
