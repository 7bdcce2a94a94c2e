"""Regenerates the PyTorch reference's golden outputs that the parity tests read.

  python -m ctm_jax.tools.make_goldens --reference=DIR --out=DIR [--cases=a,b] [--compact]

DIR is a checkout of github.com/SakanaAI/continuous-thought-machines (the
goldens were made at aecfb63); its `models/` and `utils/losses.py` are imported
from there at run time (benchmarks/reference_adapter.py), nothing of it is part
of this project. Needs PyTorch (`pip install -e '.[torch]'`).

Per case (the recipe of ../shared/golden/README.md, which these files follow
key for key):

  seed every RNG -> build -> one no_grad dummy forward on the first sample
  (materialises the Lazy modules) -> optional perturbation -> state_dict ->
  forward(track=False) with hooks on the top-level modules -> forward(track=True)
  -> task loss -> backward,

all in eval mode, written as `<case>.npz` (np.savez, no object arrays) and
`<case>.json` (constructor kwargs, input spec, loss, shapes, ...). Inputs come
from their own seeded generators, never from numpy's global RNG, which the
reference uses for its neuron indices.

Every case has a `<case>__perturbed` twin whose trivial constants (LayerNorm
and BatchNorm affine and statistics, attention biases, NLM biases and
temperatures, decay parameters, LSTM biases and start states) are made
non-trivial, so that a port which drops one of them fails. `--compact` makes
the set shipped in tests/golden: one plain and one perturbed case per model
class, 5.7 MiB, written compressed (np.savez_compressed), each perturbed twin
holding only the state entries its perturbation changed and naming its plain
twin in `__state_from__` for the rest (load_case fills them in). Most of it
is the ResNet's weights and gradients in the image and FF classes (~1 MB a
file; resnet18-1 is the reference's smallest backbone).
"""

import contextlib
import importlib
import json
import os
import random
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

SEED = 0
PERTURBED = '__perturbed'
# Input generators, offset from the model seed so that inputs never share a stream.
TORCH_INPUT_OFFSET = 1000
NUMPY_INPUT_OFFSET = 2000
PERTURB_OFFSET = 3000
# The reference's module and class for each model variant.
VARIANTS = {
    'ctm': ('models.ctm', 'ContinuousThoughtMachine'),
    'sort': ('models.ctm_sort', 'ContinuousThoughtMachineSORT'),
    'qamnist': ('models.ctm_qamnist', 'ContinuousThoughtMachineQAMNIST'),
    'rl': ('models.ctm_rl', 'ContinuousThoughtMachineRL'),
    'lstm': ('models.lstm', 'LSTMBaseline'),
    'lstm_qamnist': ('models.lstm_qamnist', 'LSTMBaseline'),
    'lstm_rl': ('models.lstm_rl', 'LSTMBaseline'),
    'ff': ('models.ff', 'FFBaseline'),
}
# Names of the `track=True` returns (a nested tuple is flattened in order; None dropped).
TRACK_NAMES = {
    'ctm': ('predictions', 'certainties', ('synch_out', 'synch_action'), 'pre_activations',
            'post_activations', 'attention'),
    'sort': ('predictions', 'certainties', 'synch_out', 'pre_activations', 'post_activations',
             'attention'),
    'qamnist': ('predictions', 'certainties', 'synchronisation_out', 'pre_activations',
                'post_activations', 'attention', 'embeddings'),
    'rl': ('synchronisation_out', ('state_trace', 'activated_state_trace'), 'pre_activations',
           'post_activations'),
    'lstm': ('predictions', 'certainties', None, 'pre_activations', 'post_activations',
             'attention'),
    'lstm_qamnist': ('predictions', 'certainties', None, 'pre_activations', 'post_activations',
                     'attention', 'embeddings'),
    'lstm_rl': ('hidden_state', ('new_hidden_state', 'new_cell_state'), 'pre_activations',
                'post_activations'),
}
# ... and of the plain returns.
OUT_NAMES = {
    'ctm': ('predictions', 'certainties', 'synchronisation_out'),
    'sort': ('predictions', 'certainties', 'synchronisation_out'),
    'qamnist': ('predictions', 'certainties', 'synchronisation_out'),
    'rl': ('synchronisation_out', ('state_trace', 'activated_state_trace')),
    'lstm': ('predictions', 'certainties', None),
    'lstm_qamnist': ('predictions', 'certainties', None),
    'lstm_rl': ('hidden_state', ('new_hidden_state', 'new_cell_state')),
    'ff': ('predictions',),
}
FF_TRACK = 'not supported: FFBaseline.forward(x) has no track argument'
# The LSTM baselines' loss selection, as their train scripts choose it.
LSTM_MOST_CERTAIN = {'lstm_parity': False, 'lstm_compact': False, 'lstm_image': True,
                     'lstm_maze': False, 'lstm_qamnist': False}


# The cases, as data: variant, the reference constructor's kwargs, the inputs, the loss.
CASES = {
    'parity': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=10, d_model=64, d_input=32, heads=4, n_synch_out=16, n_synch_action=16,
            synapse_depth=1, memory_length=8, deep_nlms=True, memory_hidden_dims=8,
            do_layernorm_nlm=False, backbone_type='parity_backbone',
            positional_embedding_type='custom-rotational-1d', out_dims=32,
            prediction_reshaper=[16, 2], dropout=0.0, neuron_select_type='random'),
        inputs_spec=dict(kind='parity', batch=4, length=16),
        loss='parity'),
    'image_rp': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=8, d_model=64, d_input=32, heads=4, n_synch_out=32, n_synch_action=24,
            synapse_depth=4, memory_length=6, deep_nlms=True, memory_hidden_dims=8,
            do_layernorm_nlm=False, backbone_type='resnet18-1',
            positional_embedding_type='learnable-fourier', out_dims=10, prediction_reshaper=[-1],
            dropout=0.0, neuron_select_type='random-pairing', n_random_pairing_self=4),
        inputs_spec=dict(kind='image', batch=2, shape=[3, 32, 32], n_classes=10),
        loss='image'),
    'firstlast_unet8': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=6, d_model=128, d_input=32, heads=4, n_synch_out=16, n_synch_action=8,
            synapse_depth=8, memory_length=5, deep_nlms=False, memory_hidden_dims=4,
            do_layernorm_nlm=True, backbone_type='resnet18-2',
            positional_embedding_type='custom-rotational', out_dims=50,
            prediction_reshaper=[10, 5], dropout=0.0, neuron_select_type='first-last'),
        inputs_spec=dict(kind='maze', batch=2, cells=19, route_length=10),
        loss='maze'),
    'none_heads2': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=5, d_model=48, d_input=16, heads=2, n_synch_out=12, n_synch_action=10,
            synapse_depth=2, memory_length=4, deep_nlms=True, memory_hidden_dims=4,
            do_layernorm_nlm=False, backbone_type='none', positional_embedding_type='none',
            out_dims=5, prediction_reshaper=[-1], dropout=0.0,
            neuron_select_type='random-pairing'),
        inputs_spec=dict(kind='tokens', batch=3, channels=8, length=6, n_classes=5),
        loss='image'),
    'sort': dict(
        variant='sort',
        constructor_kwargs=dict(
            iterations=12, d_model=64, d_input=8, heads=0, n_synch_out=16, n_synch_action=0,
            synapse_depth=2, memory_length=5, deep_nlms=True, memory_hidden_dims=4,
            do_layernorm_nlm=False, backbone_type='none', positional_embedding_type='none',
            out_dims=9, prediction_reshaper=[-1], dropout=0.0,
            neuron_select_type='random-pairing'),
        inputs_spec=dict(kind='sort', batch=3, N=8),
        loss='sort'),
    'qamnist': dict(
        variant='qamnist',
        constructor_kwargs=dict(
            iterations=10, d_model=64, d_input=16, heads=2, n_synch_out=8, n_synch_action=8,
            synapse_depth=1, memory_length=3, deep_nlms=True, memory_hidden_dims=4,
            do_layernorm_nlm=False, out_dims=10, iterations_per_digit=1,
            iterations_per_question_part=1, iterations_for_answering=1, prediction_reshaper=[-1],
            dropout=0.0, neuron_select_type='random', n_random_pairing_self=0),
        inputs_spec=dict(kind='qamnist', batch=2, n_digits=3, n_ops=2),
        loss='qamnist'),
    'rl_classic': dict(
        variant='rl',
        constructor_kwargs=dict(
            iterations=2, d_model=32, d_input=16, n_synch_out=8, synapse_depth=1,
            memory_length=5, deep_nlms=True, memory_hidden_dims=2, do_layernorm_nlm=False,
            backbone_type='classic-control-backbone', prediction_reshaper=[-1], dropout=0.0,
            neuron_select_type='first-last'),
        inputs_spec=dict(kind='rl_classic', batch=3, obs_dim=4),
        loss='rl_sq'),
    'rl_navigation': dict(
        variant='rl',
        constructor_kwargs=dict(
            iterations=2, d_model=32, d_input=8, n_synch_out=6, synapse_depth=2,
            memory_length=4, deep_nlms=True, memory_hidden_dims=2, do_layernorm_nlm=False,
            backbone_type='navigation-backbone', prediction_reshaper=[-1], dropout=0.0,
            neuron_select_type='first-last'),
        inputs_spec=dict(kind='rl_navigation', batch=2),
        loss='rl_sq'),
    'lstm_parity': dict(
        variant='lstm',
        constructor_kwargs=dict(
            iterations=10, d_model=64, d_input=32, heads=4, backbone_type='parity_backbone',
            num_layers=2, positional_embedding_type='custom-rotational-1d', out_dims=32,
            prediction_reshaper=[16, 2], dropout=0.0),
        inputs_spec=dict(kind='parity', batch=4, length=16),
        loss='parity'),
    'lstm_image': dict(
        variant='lstm',
        constructor_kwargs=dict(
            iterations=8, d_model=64, d_input=32, heads=4, backbone_type='resnet18-1',
            num_layers=1, positional_embedding_type='learnable-fourier', out_dims=10,
            prediction_reshaper=[-1], dropout=0.0),
        inputs_spec=dict(kind='image', batch=2, shape=[3, 32, 32], n_classes=10),
        loss='image'),
    'lstm_maze': dict(
        variant='lstm',
        constructor_kwargs=dict(
            iterations=6, d_model=128, d_input=32, heads=4, backbone_type='resnet18-2',
            num_layers=2, positional_embedding_type='custom-rotational', out_dims=50,
            prediction_reshaper=[10, 5], dropout=0.0),
        inputs_spec=dict(kind='maze', batch=2, cells=19, route_length=10),
        loss='maze'),
    'lstm_qamnist': dict(
        variant='lstm_qamnist',
        constructor_kwargs=dict(
            iterations=10, d_model=64, d_input=16, heads=2, out_dims=10, iterations_per_digit=1,
            iterations_per_question_part=1, iterations_for_answering=1, prediction_reshaper=[-1],
            dropout=0.0),
        inputs_spec=dict(kind='qamnist', batch=2, n_digits=3, n_ops=2),
        loss='qamnist'),
    'lstm_rl_classic': dict(
        variant='lstm_rl',
        constructor_kwargs=dict(
            iterations=2, d_model=32, d_input=16, backbone_type='classic-control-backbone'),
        inputs_spec=dict(kind='rl_classic', batch=3, obs_dim=4),
        loss='rl_sq'),
    'lstm_rl_navigation': dict(
        variant='lstm_rl',
        constructor_kwargs=dict(
            iterations=2, d_model=32, d_input=8, backbone_type='navigation-backbone'),
        inputs_spec=dict(kind='rl_navigation', batch=2),
        loss='rl_sq'),
    'ff_image': dict(
        variant='ff',
        constructor_kwargs=dict(d_model=64, backbone_type='resnet18-1', out_dims=10,
                                dropout=0.0),
        inputs_spec=dict(kind='image', batch=2, shape=[3, 32, 32], n_classes=10),
        loss='ff_ce'),
    # The compact stand-ins, small enough to ship (tests/golden): image_rp's code
    # path (ResNet + learnable-fourier + random-pairing + U-Net) on 12x12 images,
    # resnet18-1 being the reference's smallest ResNet; firstlast_unet8's
    # (first-last + U-Net + shallow NLMs with LayerNorm + maze loss) on the
    # maze's raw pixels, without a backbone (the ResNet is image_compact's and
    # ff_compact's to check, the 2D rotational embedding the full set's); ff_image
    # on 12x12 images; lstm_parity (two layers) at a quarter of the width.
    'image_compact': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=4, d_model=32, d_input=16, heads=2, n_synch_out=12, n_synch_action=10,
            synapse_depth=3, memory_length=4, deep_nlms=True, memory_hidden_dims=4,
            do_layernorm_nlm=False, backbone_type='resnet18-1',
            positional_embedding_type='learnable-fourier', out_dims=10, prediction_reshaper=[-1],
            dropout=0.0, neuron_select_type='random-pairing', n_random_pairing_self=2),
        inputs_spec=dict(kind='image', batch=2, shape=[3, 12, 12], n_classes=10),
        loss='image'),
    'maze_compact': dict(
        variant='ctm',
        constructor_kwargs=dict(
            iterations=4, d_model=40, d_input=16, heads=2, n_synch_out=8, n_synch_action=6,
            synapse_depth=4, memory_length=4, deep_nlms=False, memory_hidden_dims=4,
            do_layernorm_nlm=True, backbone_type='none', positional_embedding_type='none',
            out_dims=30, prediction_reshaper=[6, 5], dropout=0.0, neuron_select_type='first-last'),
        inputs_spec=dict(kind='maze', batch=2, cells=5, route_length=6),
        loss='maze'),
    'lstm_compact': dict(
        variant='lstm',
        constructor_kwargs=dict(
            iterations=6, d_model=24, d_input=16, heads=2, backbone_type='parity_backbone',
            num_layers=2, positional_embedding_type='custom-rotational-1d', out_dims=16,
            prediction_reshaper=[8, 2], dropout=0.0),
        inputs_spec=dict(kind='parity', batch=3, length=8),
        loss='parity'),
    'ff_compact': dict(
        variant='ff',
        constructor_kwargs=dict(d_model=32, backbone_type='resnet18-1', out_dims=10,
                                dropout=0.0),
        inputs_spec=dict(kind='image', batch=2, shape=[3, 12, 12], n_classes=10),
        loss='ff_ce'),
}
# One plain and one perturbed case per model class, for tests/golden.
COMPACT = ('parity', 'image_compact', 'maze_compact', 'sort', 'qamnist', 'rl_classic',
           'lstm_compact', 'ff_compact')
# The set of ../shared/golden.
FULL = tuple(c for c in CASES if not c.endswith('_compact'))


def all_names(bases):
  return [name for base in bases for name in (base, base + PERTURBED)]


class Reference:
  """The reference's modules, imported from its checkout."""

  def __init__(self, ref_dir):
    # The adapter checks the checkout and imports torch, models/ctm.py and utils/losses.py.
    benchmarks = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'benchmarks')
    if not os.path.isfile(os.path.join(benchmarks, 'reference_adapter.py')):
      raise ImportError(f'{os.path.normpath(benchmarks)}/reference_adapter.py not found: '
                        'run make_goldens from a source checkout of ctm-jax')
    sys.path.insert(0, benchmarks)
    import reference_adapter  # pylint: disable=g-import-not-at-top
    self.adapter = reference_adapter.Reference(ref_dir)
    self.torch = self.adapter.torch
    self.losses = self.adapter.losses
    self.commit = self.adapter.commit()
    if self.commit != 'unknown':  # the full hash, as the shared goldens record it
      head = subprocess.run(['git', '-C', self.adapter.dir, 'rev-parse', 'HEAD'],
                            capture_output=True, text=True, check=False).stdout.strip()
      self.commit = head + self.commit[len(self.commit.split('-')[0]):] if head else self.commit

  def model_class(self, variant):
    module, name = VARIANTS[variant]
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ inputs


def make_inputs(torch, spec, seed, model=None):
  """(inputs dict name -> tensor, targets tensor or None) of an input spec."""
  gen = torch.Generator().manual_seed(seed + TORCH_INPUT_OFFSET)
  kind, b = spec['kind'], spec['batch']
  if kind == 'parity':
    x = (torch.randint(0, 2, (b, spec['length']), generator=gen) * 2 - 1).float()
    targets = (torch.cumsum((x == -1).long(), 1) % 2).long()
    return {'x': x}, targets
  if kind == 'image':
    x = torch.randn(b, *spec['shape'], generator=gen)
    return {'x': x}, torch.randint(0, spec['n_classes'], (b,), generator=gen)
  if kind == 'tokens':
    x = torch.randn(b, spec['channels'], spec['length'], generator=gen)
    return {'x': x}, torch.randint(0, spec['n_classes'], (b,), generator=gen)
  if kind == 'sort':
    x = torch.randn(b, spec['N'], generator=gen)
    return {'x': x}, torch.argsort(x, dim=1)
  if kind == 'qamnist':
    return _qamnist_inputs(torch, gen, b, spec['n_digits'], spec['n_ops'])
  if kind == 'maze':
    return _maze_inputs(torch, np.random.default_rng(seed + NUMPY_INPUT_OFFSET), spec)
  if kind in ('rl_classic', 'rl_navigation'):
    if kind == 'rl_classic':
      x = torch.randn(b, spec['obs_dim'], generator=gen)
    else:  # MiniGrid symbolic observations: object, colour, state per cell.
      x = torch.stack(
          [torch.randint(0, n, (b, 7, 7), generator=gen) for n in (11, 6, 3)], -1
      )
    return {'x': x}, None  # the recurrent state comes from the model (rl_state)
  raise ValueError(f'unknown input kind {kind!r}')


def _qamnist_inputs(torch, gen, b, n_digits, n_ops):
  """Digit images, the question (index, operator, index, ...) and its answer mod 10."""
  x = torch.randn(b, n_digits, 1, 28, 28, generator=gen)
  labels = torch.randint(0, 10, (b, n_digits), generator=gen)
  draw = lambda n: int(torch.randint(0, n, (1,), generator=gen))
  questions, answers = [], []
  for i in range(b):
    index = draw(n_digits)
    question, value = [index], int(labels[i, index]) % 10
    for _ in range(n_ops):
      op = draw(2)
      index = draw(n_digits)
      question += [-(op + 1), index]  # -1 '+', -2 '-'
      digit = int(labels[i, index])
      value = (value + digit) % 10 if op == 0 else (value - digit) % 10
    questions.append(question)
    answers.append(value)
  return {'x': x, 'z': torch.tensor(questions)}, torch.tensor(answers)


def _maze_inputs(torch, rng, spec):
  """Mazes with red start and green goal pixels (route not drawn); targets the first moves."""
  from ctm_jax.data import mazes  # pylint: disable=g-import-not-at-top
  size = 2 * spec['cells'] + 1
  images, routes = [], []
  for _ in range(spec['batch']):
    free_HxW = mazes.generate(size, rng)
    pixels = np.argwhere(free_HxW)
    first, second = rng.choice(len(pixels), 2, replace=False)
    path = mazes.shortest_path(free_HxW, tuple(pixels[first]), tuple(pixels[second]))
    image_HxWx3 = mazes.model_input(mazes.render(free_HxW, path), expand_range=False)
    images.append(image_HxWx3.transpose(2, 0, 1))
    routes.append(mazes.pad_route(mazes.directions(path), spec['route_length']))
  x = torch.from_numpy(np.stack(images).astype(np.float32))
  return {'x': x}, torch.from_numpy(np.stack(routes).astype(np.int64))


def rl_state(torch, variant, model, batch):
  """The recurrent state the RL agent starts from: the start parameters over the batch."""
  rep = lambda p: torch.repeat_interleave(p.detach().unsqueeze(0), batch, 0)
  if variant == 'rl':
    return {
        'hidden_state_trace': rep(model.start_trace),
        'hidden_activated_state_trace': rep(model.start_activated_trace),
    }
  return {'hidden_state': rep(model.start_hidden_state), 'cell_state': rep(model.start_cell_state)}


def forward(model, variant, inputs, **kw):
  if variant in ('qamnist', 'lstm_qamnist'):
    return model(inputs['x'], inputs['z'], **kw)
  if variant == 'rl':
    state = (inputs['hidden_state_trace'], inputs['hidden_activated_state_trace'])
    return model(inputs['x'], state, **kw)
  if variant == 'lstm_rl':
    return model(inputs['x'], (inputs['hidden_state'], inputs['cell_state']), **kw)
  if variant == 'ff':
    return (model(inputs['x']),)
  return model(inputs['x'], **kw)


# ------------------------------------------------------------------ perturbation


def perturb(torch, model, seed):
  """Makes trivial constants non-trivial (see the module docstring), in module order."""
  gen = torch.Generator().manual_seed(seed + PERTURB_OFFSET)
  normal = lambda t, std: torch.randn(t.shape, generator=gen) * std
  uniform = lambda t, lo, hi: lo + (hi - lo) * torch.rand(t.shape, generator=gen)
  nn = torch.nn
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm1d)):
        if module.weight is not None:
          module.weight += normal(module.weight, 0.1)
          module.bias += normal(module.bias, 0.05)
        if getattr(module, 'running_mean', None) is not None:
          module.running_mean.copy_(normal(module.running_mean, 0.1))
          module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
      elif isinstance(module, nn.MultiheadAttention):
        module.in_proj_bias += normal(module.in_proj_bias, 0.05)
        module.out_proj.bias += normal(module.out_proj.bias, 0.05)
      elif type(module).__name__ == 'SuperLinear':
        module.b1 += normal(module.b1, 0.05)
        module.T.copy_(uniform(module.T, 0.8, 1.2))
      elif isinstance(module, (nn.LSTM, nn.LSTMCell)):
        for name, p in module.named_parameters():
          if name.startswith('bias_'):
            p += normal(p, 0.1)
          if name.startswith('bias_hh'):
            # Per-gate offsets (i, f, g, o): a wrong gate order shows.
            h = p.shape[0] // 4
            for gate, offset in enumerate((0.25, 0.75, -0.25, 0.5)):
              p[gate * h:(gate + 1) * h] += offset
    for name, p in model.named_parameters():
      if name.startswith('decay_params'):
        # Outside the clamp range [0, 15] at both ends.
        p.copy_(uniform(p, 0.0, 2.5))
        p[0], p[1] = -1.0, 20.0
      elif name.endswith('start_vector') or name.endswith('combination'):
        p += normal(p, 0.1)
      elif name in ('start_hidden_state', 'start_cell_state'):
        p += normal(p, 0.2)


# ------------------------------------------------------------------ running a case


def _flatten(value, names, prefix):
  """(name, array) pairs of a (nested) return value; None entries skipped."""
  out = []
  if isinstance(names, tuple):
    for v, n in zip(value, names):
      if n is not None and v is not None:
        out += _flatten(v, n, prefix)
    return out
  if hasattr(value, 'detach'):
    value = value.detach().cpu().numpy()
  return [(prefix + names, np.asarray(value))]


def _tensors(value):
  """The tensors of a module output, in order (nested tuples flattened)."""
  if isinstance(value, (tuple, list)):
    return [t for v in value for t in _tensors(v)]
  return [] if value is None else [value]


def _numpy(a):
  a = np.asarray(a)
  if a.dtype == np.float64:
    a = a.astype(np.float32)
  return a


def run_case(ref, name):
  """(arrays, meta) of one case."""
  torch = ref.torch
  base, perturbed = (name[: -len(PERTURBED)], True) if name.endswith(PERTURBED) else (name, False)
  case = CASES[base]
  variant, kwargs, spec = case['variant'], dict(case['constructor_kwargs']), case['inputs_spec']
  started = time.perf_counter()
  random.seed(SEED)
  np.random.seed(SEED)
  torch.manual_seed(SEED)
  # The reference prints (synch sizes, ...) from its constructors.
  with contextlib.redirect_stdout(sys.stderr):
    model = ref.model_class(variant)(**kwargs)
  model.eval()
  inputs, targets = make_inputs(torch, spec, SEED)
  # lstm_qamnist squeezes its batch axis away at batch 1: two samples there.
  n_dummy = 2 if variant == 'lstm_qamnist' else 1
  dummy = {k: v[:n_dummy] for k, v in inputs.items()}
  if variant in ('rl', 'lstm_rl'):
    dummy.update(rl_state(torch, variant, model, n_dummy))
  with torch.no_grad():
    forward(model, variant, dummy)
  if perturbed:
    perturb(torch, model, SEED)
  if variant in ('rl', 'lstm_rl'):  # from the (perturbed) start parameters
    inputs.update(rl_state(torch, variant, model, spec['batch']))

  arrays = {}
  sd = model.state_dict()
  for k, v in sd.items():
    arrays[k] = _numpy(v.detach().cpu().numpy()).copy()
  for k, v in inputs.items():
    arrays[f'__in__{k}'] = _numpy(v.numpy())
  if targets is not None:
    arrays['__target__targets'] = targets.numpy().astype(np.int64)

  # Hooks on the top-level modules, plain forward.
  calls, order = {}, []
  handles = []
  for child_name, child in model.named_children():
    def hook(_, __, output, child_name=child_name):
      if child_name not in calls:
        calls[child_name] = []
        order.append(child_name)
      calls[child_name].append([t.detach().cpu().numpy().copy() for t in _tensors(output)])
    handles.append(child.register_forward_hook(hook))
  plain = forward(model, variant, inputs)
  for h in handles:
    h.remove()
  for k, v in _flatten(plain, OUT_NAMES[variant], '__out__'):
    arrays[k] = _numpy(v)
  hook_calls = {}
  for child_name in order:
    per_call = calls[child_name]
    n_out = len(per_call[0])
    for i in range(n_out):
      key = child_name if n_out == 1 else f'{child_name}__{i}'
      outs = [c[i] for c in per_call]
      hook_calls[key] = len(outs)
      if all(o.shape == outs[0].shape for o in outs):
        arrays[f'__hook__{key}'] = _numpy(np.stack(outs))
      else:  # e.g. kv_proj on digit and question ticks: stored per call
        for j, o in enumerate(outs):
          arrays[f'__hook__{key}__call{j}'] = _numpy(o)
  for k, p in model.named_parameters():
    if k.startswith('decay_params'):
      arrays[f'__post__{k}'] = _numpy(p.detach().numpy()).copy()

  # Tracked forward; the loss and gradients from it.
  tracked = None
  if variant != 'ff':
    tracked = forward(model, variant, inputs, track=True)
    for k, v in _flatten(tracked, TRACK_NAMES[variant], '__track__'):
      arrays[k] = _numpy(v)
  source = tracked if tracked is not None else plain
  use_most_certain = LSTM_MOST_CERTAIN.get(base, True)
  loss_parts = task_loss(ref, case, kwargs, source, targets, use_most_certain)
  loss = loss_parts['loss']
  loss.backward()
  for k, v in loss_parts.items():
    arrays[f'__loss__{k}'] = _numpy(v.detach().numpy() if hasattr(v, 'detach') else v)
  grads_missing = []
  for k, p in model.named_parameters():
    if p.grad is None:
      grads_missing.append(k)
    else:
      arrays[f'__grad__{k}'] = _numpy(p.grad.numpy()).copy()

  meta = dict(
      case=base, tag=name, variant=variant, constructor_kwargs=case['constructor_kwargs'],
      inputs_spec=spec, loss=case['loss'], seed=SEED, perturbed=perturbed,
      torch_version=torch.__version__, numpy_version=np.__version__,
      reference_commit=ref.commit, mode='eval', dtype='float32',
  )
  if variant in ('lstm', 'lstm_qamnist'):
    meta['use_most_certain'] = use_most_certain
  if variant == 'ff':
    meta['track'] = FF_TRACK
  meta['state_dict'] = {
      k: dict(shape=list(v.shape), dtype=str(arrays[k].dtype)) for k, v in sd.items()
  }
  meta['n_params'] = int(sum(p.numel() for p in model.parameters()))
  meta['hook_calls'] = hook_calls
  if variant not in ('rl', 'ff'):
    pairs = zip(_flatten(plain, OUT_NAMES[variant], ''), _flatten(tracked, TRACK_NAMES[variant], ''))
    meta['track_matches_plain'] = all(
        np.array_equal(a, b) for (_, a), (_, b) in pairs if a.shape == b.shape
    )
  meta['loss_value'] = loss.item()
  meta['grads_missing'] = grads_missing
  meta['status'] = 'ok'
  meta['array_keys'] = sorted(arrays)
  meta['elapsed_s'] = round(time.perf_counter() - started, 3)
  text = json.dumps(meta, indent=1)
  arrays['__state_dict_keys__'] = np.array(list(sd.keys()))
  arrays['__config_json__'] = np.array(text)
  return arrays, meta, text


def task_loss(ref, case, kwargs, outputs, targets, use_most_certain):
  """The task's training loss of the reference's utils/losses.py: {'loss': ..., ...}."""
  torch, losses, kind = ref.torch, ref.losses, case['loss']
  if kind == 'rl_sq':  # mean square of the output state: a scalar for the gradients only
    return {'loss': (outputs[0] ** 2).mean()}
  if kind == 'ff_ce':
    return {'loss': torch.nn.CrossEntropyLoss()(outputs[0], targets)}
  predictions, certainties = outputs[0], outputs[1]
  if kind == 'sort':
    return {'loss': losses.sort_loss(predictions, targets)}
  shaped = predictions.reshape(
      predictions.size(0), *kwargs['prediction_reshaper'], predictions.size(-1)
  )
  if kind == 'maze':
    loss, where, upto = losses.maze_loss(
        shaped, certainties, targets, use_most_certain=use_most_certain
    )
    return {'loss': loss, 'where_most_certain': where, 'upto_where': upto}
  fn = {'parity': losses.parity_loss, 'image': losses.image_classification_loss,
        'qamnist': losses.qamnist_loss}[kind]
  loss, where = fn(shaped, certainties, targets, use_most_certain=use_most_certain)
  return {'loss': loss, 'where_most_certain': where}


# Json fields that describe the run rather than the case.
RUN_FIELDS = ('torch_version', 'numpy_version', 'reference_commit', 'loss_value', 'elapsed_s')
# Arrays set before any arithmetic: equal bit for bit on every CPU.
EXACT_PREFIXES = ('__in__', '__target__')


def differences(ours, theirs, tol=1e-4):
  """(problems, max error, its key) between two cases' arrays (dicts of name -> array).

  State-dict entries, inputs, targets and integer arrays must be equal; float
  results within `tol`, relative where |value| > 1 (tests/conftest.assert_close):
  other CPUs round the reference's forwards differently in the last bits.
  """
  problems, worst = [], (0.0, None)
  if set(ours) != set(theirs):
    problems.append(f'keys: only ours {sorted(set(ours) - set(theirs))}, '
                    f'only theirs {sorted(set(theirs) - set(ours))}')
  state = set(np.asarray(theirs.get('__state_dict_keys__', [])).tolist())
  for key in sorted(set(ours) & set(theirs)):
    a, b = np.asarray(ours[key]), np.asarray(theirs[key])
    if key == '__config_json__':
      ja, jb = json.loads(str(a)), json.loads(str(b))
      fields = [f for f in set(ja) | set(jb) if f not in RUN_FIELDS and ja.get(f) != jb.get(f)]
      if fields:
        problems.append(f'json fields differ: {sorted(fields)}')
      continue
    if a.shape != b.shape or a.dtype != b.dtype:
      problems.append(f'{key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}')
    elif a.dtype.kind != 'f' or key in state or key.startswith(EXACT_PREFIXES):
      if not np.array_equal(a, b):
        problems.append(f'{key}: not equal')
    else:
      err = np.abs(a.astype(np.float64) - b) / np.maximum(1.0, np.abs(b.astype(np.float64)))
      err = float(err.max(initial=0.0))
      if err > worst[0]:
        worst = (err, key)
      if err > tol:
        problems.append(f'{key}: max error {err:.3g} > {tol}')
  return problems, worst[0], worst[1]


# In the compact set, a perturbed twin names its plain twin here and stores only
# the state-dict entries that the perturbation changed; the rest are the twin's.
STATE_FROM = '__state_from__'


def _read(path):
  with np.load(path, allow_pickle=False) as z:
    return dict(z)


def load_case(directory, name):
  """A case's arrays, whole (state shared with a twin filled in); None where `directory` lacks it."""
  path = os.path.join(directory, f'{name}.npz')
  if not os.path.exists(path):
    return None
  arrays = _read(path)
  if STATE_FROM in arrays:
    twin = str(arrays.pop(STATE_FROM))
    twin_path = os.path.join(directory, f'{twin}.npz')
    if twin != name.removesuffix(PERTURBED) or not os.path.exists(twin_path):
      raise FileNotFoundError(f'{path} takes its unchanged state from {twin_path}, not found')
    shared = _read(twin_path)
    for key in arrays['__state_dict_keys__'].tolist():
      if key not in arrays:
        arrays[key] = shared[key]
  return arrays


def shared_with_twin(arrays, twin, twin_name):
  """`arrays` less the state-dict entries equal to its plain twin's, for the compact set."""
  state = set(arrays['__state_dict_keys__'].tolist())
  kept = {k: v for k, v in arrays.items()
          if not (k in state and k in twin and v.dtype == twin[k].dtype
                  and np.array_equal(v, twin[k]))}
  kept[STATE_FROM] = np.array(twin_name)
  return kept


def write_case(out_dir, name, arrays, text, compact=False):
  """`<name>.npz` and `<name>.json`; the compact set's npz is compressed and a
  perturbed twin there shares its unchanged state with `<plain>.npz` in out_dir."""
  path = os.path.join(out_dir, f'{name}.npz')
  if compact:
    plain = name.removesuffix(PERTURBED)
    twin = load_case(out_dir, plain) if plain != name else None
    if twin is not None:
      arrays = shared_with_twin(arrays, twin, plain)
    np.savez_compressed(path, **arrays)
  else:
    np.savez(path, **arrays)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    f.write(text)


def selected_cases(cases, compact):
  names = all_names(COMPACT if compact else CASES)
  if cases:
    unknown = [c for c in cases if c.removesuffix(PERTURBED) not in CASES]
    if unknown:
      raise ValueError(f'--cases: unknown {unknown}; known: {sorted(CASES)}')
    names = [n for n in names if n in cases or n.removesuffix(PERTURBED) in cases]
  return names


def define_flags():
  """The command line's flags (defined only when run, so that tests can import this module)."""
  flags.DEFINE_string(
      'reference', None, 'Checkout of github.com/SakanaAI/continuous-thought-machines.'
  )
  flags.DEFINE_string('out', None, 'Directory for <case>.npz and <case>.json.')
  flags.DEFINE_list(
      'cases', None, 'Cases to make (names as in the table, with or without __perturbed).'
  )
  flags.DEFINE_bool('compact', False, 'Only the compact set shipped in tests/golden.')
  flags.DEFINE_string(
      'compare', None, 'Compare each case with the one of the same name in this directory '
      '(e.g. ../shared/golden); exit 1 if any differs.'
  )


def main(argv):
  del argv
  values = flags.FLAGS
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("make_goldens needs PyTorch: pip install -e '.[torch]'", file=sys.stderr)
    sys.exit(2)
  ref_dir = values.reference
  if not ref_dir or not os.path.isfile(os.path.join(ref_dir, 'models', 'ctm.py')):
    print(
        f'make_goldens: --reference={ref_dir} is not a checkout of '
        'github.com/SakanaAI/continuous-thought-machines (no models/ctm.py there)',
        file=sys.stderr,
    )
    sys.exit(2)
  if not values.out:
    print('make_goldens: --out=DIR is required', file=sys.stderr)
    sys.exit(2)
  try:
    names = selected_cases(values.cases, values.compact)
  except ValueError as e:
    print(f'make_goldens: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    ref = Reference(ref_dir)
  except (ImportError, FileNotFoundError) as e:
    print(f'make_goldens: {e}', file=sys.stderr)
    sys.exit(2)
  os.makedirs(values.out, exist_ok=True)
  failed = []
  for name in names:
    arrays, meta, text = run_case(ref, name)
    write_case(values.out, name, arrays, text, compact=values.compact)
    size = os.path.getsize(os.path.join(values.out, f'{name}.npz'))
    line = f'{name}: {len(arrays)} arrays, {size / 2**20:.2f} MiB, loss {meta["loss_value"]:.6g}'
    theirs = load_case(values.compare, name) if values.compare else None
    if theirs is not None:
      problems, err, key = differences(arrays, theirs)
      line += f'; vs {values.compare}: ' + (
          f'{len(problems)} differences: ' + '; '.join(problems[:5]) if problems
          else f'agrees (max error {err:.2g} in {key})'
      )
      if problems:
        failed.append(name)
    print(line, flush=True)
  if failed:
    print(f'make_goldens: {len(failed)} cases differ from {values.compare}: {failed}')
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
