"""The reference's RL training script, run for rl_bench (benchmarks/rl_bench.py)
in a process of its own, with the reference checkout as its working directory
and first on its PYTHONPATH; see rl_bench's docstring for what it changes and
records. Not imported by the benchmarks package.

argv: DIR, the training script (relative to DIR, as the task's
`reference_script` names it), the record file (JSON lines), torch threads,
plots mode (auto/run/skip), then the script's flags.
"""
import ast, json, multiprocessing, os, sys, time, types

ref_dir, script, record_path, threads, plots = sys.argv[1:6]
sys.argv = [os.path.join(ref_dir, script)] + sys.argv[6:]
_out = open(record_path, 'a', buffering=1)


def record(event, **fields):
  _out.write(json.dumps(dict(event=event, t=time.perf_counter(), **fields)) + '\n')


import torch
torch.set_num_threads(int(threads))
record('torch', version=torch.__version__, threads=torch.get_num_threads())


class _Missing(types.ModuleType):
  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    raise ImportError(f'{self.__name__} is not installed (a stub of the RL benchmark)')


for _name in ('cv2', 'umap'):  # imported by tasks/image_classification/plotting.py only
  try:
    __import__(_name)
  except ImportError:
    sys.modules[_name] = _Missing(_name)
    record('stub', module=_name)

try:
  from tensorboardX import SummaryWriter as _Base
  _writer = 'tensorboardX'
except ImportError:
  try:
    from torch.utils.tensorboard import SummaryWriter as _Base
    _writer = 'torch.utils.tensorboard'
  except ImportError:
    _Base, _writer = None, 'none'
record('writer', kind=_writer)


class SummaryWriter(_Base or object):
  def __init__(self, *args, **kwargs):
    if _Base is not None:
      super().__init__(*args, **kwargs)

  def add_scalar(self, tag, value, global_step=None, *args, **kwargs):
    if _Base is not None:
      super().add_scalar(tag, value, global_step, *args, **kwargs)
    if tag == 'charts/SPS':
      record('sps', step=int(global_step), sps=float(value))

  def add_text(self, *args, **kwargs):
    if _Base is not None:
      super().add_text(*args, **kwargs)

  def close(self):
    if _Base is not None:
      super().close()


_tb = types.ModuleType('torch.utils.tensorboard')
_tb.SummaryWriter = SummaryWriter
sys.modules['torch.utils.tensorboard'] = _tb
torch.utils.tensorboard = _tb

import gymnasium
_env_s = [0.0]
_vector_step = gymnasium.vector.SyncVectorEnv.step


def _timed_step(self, actions):
  t0 = time.perf_counter()
  try:
    return _vector_step(self, actions)
  finally:
    _env_s[0] += time.perf_counter() - t0


gymnasium.vector.SyncVectorEnv.step = _timed_step

import importlib
train = importlib.import_module(os.path.splitext(script)[0].replace(os.sep, '.'))
record('imported', file=train.__file__)

_get_value = train.Agent.get_value


def _get_value_marked(self, *args, **kwargs):
  record('rollout_end', env_s=_env_s[0])
  _env_s[0] = 0.0
  return _get_value(self, *args, **kwargs)


train.Agent.get_value = _get_value_marked

_plot = train.plot_activations
_plot_state = {'skip': plots == 'skip'}


def _plot_activations(agent, device, args):
  t0 = time.perf_counter()
  if _plot_state['skip']:
    record('plot', s=0.0, skipped=True)
    return None
  try:
    _plot(agent, device, args)
    for child in multiprocessing.active_children():  # the gif's process
      child.join()
  except Exception as e:  # pylint: disable=broad-except
    if plots != 'auto':
      raise
    agent.train()
    _plot_state['skip'] = True
    record('plot_error', error=f'{type(e).__name__}: {e}'[:500])
    record('plot', s=time.perf_counter() - t0, skipped=True)
    return None
  record('plot', s=time.perf_counter() - t0, skipped=False)


train.plot_activations = _plot_activations
_save = train.save_model


def _save_model(*args, **kwargs):
  t0 = time.perf_counter()
  _save(*args, **kwargs)
  record('save', s=time.perf_counter() - t0)


train.save_model = _save_model


def _is_main_guard(node):
  return (
      isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
      and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__'
      and len(node.test.comparators) == 1
      and isinstance(node.test.comparators[0], ast.Constant)
      and node.test.comparators[0].value == '__main__'
  )


with open(train.__file__) as f:
  tree = ast.parse(f.read(), train.__file__)
guards = [node for node in tree.body if _is_main_guard(node)]
if len(guards) != 1:
  raise RuntimeError(f'{train.__file__}: expected one `if __name__ == "__main__":` block')
main = ast.Module(body=guards[0].body, type_ignores=[])
record('start')
exec(compile(main, train.__file__, 'exec'), vars(train))
record('end')
