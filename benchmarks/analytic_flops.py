"""Matmul and convolution FLOPs of one CTM step, counted by hand from its config.

An independent check of XLA's cost analysis (`model_bench.py`'s 'XLA/analytic'
column): the count walks the model's layers as `ctm_jax/models` builds them and
adds 2 FLOPs per multiply-add of every dense layer, einsum and convolution.
Elementwise work (activations, LayerNorm, BatchNorm, GLU, softmax, the synch
update, pooling, the loss, the metrics and the optimiser's clipping and update)
is left out, so XLA's count, which includes it, is expected to be somewhat
higher: XLA/analytic is about 1.02-1.06 on model_bench's configs (up to ~1.3 on
tiny models, where the optimiser's elementwise update weighs more, and ~1.6
with the quantile clip's per-tensor sorts); below 1 or far above means one of
the two counts misses work. tests/benchmarks_test.py checks this count against
the dot_general and convolution ops of the traced train step (the trainer's,
as model_bench times it), exactly.

Conventions:
  * forward: the matmuls of `apply(train=False)`.
  * train: each matmul's forward, plus one backward matmul of the same size per
    operand that needs a gradient (the input gradient and the weight gradient),
    i.e. 3x forward, except that layers whose input is data or a constant
    (the first convolution, positional-embedding projections) skip the input
    gradient. With `remat='full'` the backward pass runs the tick body's
    forward again (+1x of the tick's matmuls), all but the output projector:
    its output leaves the tick and its backward needs only its input; 'sqrt'
    (ticks and chunks of ticks rematerialised) runs the same twice more. With
    'dots' only the batched einsums (attention, neuron-level models) run again
    (matmuls without batch dimensions are saved).
  * convolutions count only kernel taps that land inside the input, not on its
    zero padding, as XLA does.
  * a config here is a dict(batch, input_shape, model): the batch size, one
    example's input shape and the ContinuousThoughtMachine constructor kwargs.
    model_bench.analytic_spec builds it from a task config:
    `task.record_spec(config)['inputs'][0]` and `task.model_kwargs(config)`.

Dimension glossary:
  B batch            T ticks (iterations)      D neurons (d_model)
  M memory length    H NLM hidden width        E d_input (attention width)
  N tokens           C backbone channels       P synchronisation size
  K attention heads  O out_dims                h/w feature map height/width
"""

import dataclasses

import numpy as np

from ctm_jax.models import ctm

# Sizes restated from ctm_jax/models rather than imported, so that the count
# checks the model instead of echoing it. Per-stage planes and block counts of
# the reference's ResNets (its resnet152 has 4 blocks in layer2).
_STEM_CH = 64
_STAGE_PLANES = (64, 128, 256, 512)
_RESNETS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 4, 36, 3)),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}
# LearnableFourier's fixed sizes (posemb.py): Fourier features, MLP hidden width.
_FOURIER_F, _FOURIER_H, _MULTI_FOURIER_K = 256, 128, 10
MIN_UNET_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One matmul-like op: forward FLOPs and how its backward pass is counted."""

  name: str
  flops: float  # forward, 2 per multiply-add
  per_tick: bool = False
  # Backward matmuls: 2 when the input needs a gradient, 1 when only the weight does.
  backward: int = 2
  # An einsum with batch dimensions (not saved by remat policy 'dots').
  batched: bool = False
  # Its output leaves the tick unused by any backward rule, so remat never
  # recomputes it.
  tick_output: bool = False


def synch_size(neuron_select_type, n_synch):
  if neuron_select_type == 'random-pairing':
    return n_synch
  return n_synch * (n_synch + 1) // 2


def unet_widths(d_model, depth):
  return [int(w) for w in np.linspace(d_model, MIN_UNET_WIDTH, depth)]


def _conv_taps(size, kernel, stride, pad):
  """(output size, sum over outputs of the kernel taps inside the input) along one axis."""
  out = (size + 2 * pad - kernel) // stride + 1
  o = np.arange(out)[:, None]
  pos = o * stride - pad + np.arange(kernel)[None, :]
  return out, int(np.sum((pos >= 0) & (pos < size)))


class _Counter:
  """Collects the layers of one model as `Matmul`s."""

  def __init__(self, batch):
    self.batch = batch
    self.ops = []

  def dense(self, name, rows, d_in, d_out, **kw):
    self.ops.append(Matmul(name, 2.0 * rows * d_in * d_out, **kw))

  def conv(self, name, hw, c_in, c_out, kernel, stride, pad, groups=1, backward=2):
    """A conv on a (B, h, w, c_in) map; returns the output (h, w)."""
    h, w = hw
    h_out, taps_h = _conv_taps(h, kernel, stride, pad)
    w_out, taps_w = _conv_taps(w, kernel, stride, pad)
    macs = self.batch * taps_h * taps_w * (c_in // groups) * c_out
    self.ops.append(Matmul(name, 2.0 * macs, backward=backward))
    return h_out, w_out


def _resnet(counter, backbone_type, hw, c_in):
  """The reference's ResNet trunk (backbones.ResNet); returns (h, w, channels)."""
  depth, stages = backbone_type[len('resnet') :].split('-')
  block, sizes = _RESNETS[int(depth)]
  expansion = _EXPANSION[block]
  # The 1x1 'initial_rgb' conv to 3 channels; its input is the data.
  hw = counter.conv('initial_rgb', hw, c_in, 3, 1, 1, 0, backward=1)
  hw = counter.conv('stem', hw, 3, _STEM_CH, 3, 1, 1)
  hw = _conv_taps(hw[0], 3, 2, 1)[0], _conv_taps(hw[1], 3, 2, 1)[0]  # max-pool, no matmul
  ch = _STEM_CH
  for stage in range(int(stages)):
    planes = _STAGE_PLANES[stage]
    out_ch = planes * expansion
    for b in range(sizes[stage]):
      stride = 2 if stage > 0 and b == 0 else 1
      name = f'layer{stage + 1}_{b}'
      if block == 'basic':
        out_hw = counter.conv(f'{name}/conv1', hw, ch, planes, 3, stride, 1)
        counter.conv(f'{name}/conv2', out_hw, planes, planes, 3, 1, 1)
      else:
        counter.conv(f'{name}/conv1', hw, ch, planes, 1, 1, 0)
        out_hw = counter.conv(f'{name}/conv2', hw, planes, planes, 3, stride, 1)
        counter.conv(f'{name}/conv3', out_hw, planes, out_ch, 1, 1, 0)
      if stride != 1 or ch != out_ch:
        counter.conv(f'{name}/downsample', hw, ch, out_ch, 1, stride, 0)
      hw, ch = out_hw, out_ch
  return hw[0], hw[1], ch


def _shallow_wide(counter, hw, c_in):
  """backbones.ShallowWide: two 3x3 convs to 4096, each halved by a GLU."""
  hw = counter.conv('layers_0', hw, c_in, 4096, 3, 2, 1, backward=1)
  hw = counter.conv('layers_3', hw, 2048, 4096, 3, 1, 1, groups=32)
  return hw[0], hw[1], 2048


def _positional_embedding(counter, kind, spatial, channels):
  """Projections of posemb.py's embeddings; computed once per step, not per example."""
  if kind == 'none':
    return
  positions = int(np.prod(spatial))
  if kind == 'custom-rotational-1d':
    # The (L, 2) rotated vectors are constants: only the weight gradient.
    counter.dense('posemb/projection', positions, 2, channels, backward=1)
  elif kind == 'custom-rotational':
    # Projects the (W, W, 4) grid, a function of a learned start vector.
    w = spatial[-1]
    counter.dense('posemb/projection', w * w, 4, channels)
  elif kind in ('learnable-fourier', 'multi-learnable-fourier'):
    encoders = _MULTI_FOURIER_K if kind == 'multi-learnable-fourier' else 1
    for k in range(encoders):
      counter.dense(f'posemb/{k}/Wr', positions, 2, _FOURIER_F // 2, backward=1)
      counter.dense(f'posemb/{k}/mlp_0', positions, _FOURIER_F, _FOURIER_H)
      counter.dense(f'posemb/{k}/mlp_2', positions, _FOURIER_H // 2, channels)
    if encoders > 1:
      counter.dense('posemb/combination', positions * channels, encoders, 1)
  else:
    raise NotImplementedError(f'positional_embedding_type={kind!r}')


def layers(cfg):
  """The model's matmuls and convolutions, as a list of `Matmul`."""
  m = cfg['model']
  batch, input_shape = cfg['batch'], tuple(cfg['input_shape'])
  d, e, heads = m['d_model'], m['d_input'], m['heads']
  counter = _Counter(batch)
  dense = counter.dense

  # Once per step: backbone, positional embedding, key/value projections.
  backbone = m['backbone_type']
  if backbone == 'parity_backbone':
    # An embedding lookup (a gather): no matmul. One token per position.
    spatial, channels = input_shape[:1], e
  elif backbone == 'none':
    spatial, channels = input_shape[:-1], input_shape[-1]
  elif backbone == 'shallow-wide':
    *spatial, channels = _shallow_wide(counter, input_shape[:2], input_shape[2])
  elif backbone.startswith('resnet'):
    *spatial, channels = _resnet(counter, backbone, input_shape[:2], input_shape[2])
  else:
    raise NotImplementedError(f'backbone_type={backbone!r}')
  _positional_embedding(counter, m.get('positional_embedding_type', 'none'), spatial, channels)
  tokens = batch * int(np.prod(spatial))
  # kv_proj's input is data only without a backbone (which then has no embedding).
  dense('kv_proj', tokens, channels, e, backward=1 if backbone == 'none' else 2)
  dense('attention_k', tokens, e, e)
  dense('attention_v', tokens, e, e)

  # Per tick.
  n_tokens = tokens // batch
  select = m.get('neuron_select_type', 'random-pairing')
  p_action = synch_size(select, m['n_synch_action'])
  p_out = synch_size(select, m['n_synch_out'])
  tick = dict(per_tick=True)
  dense('q_proj', batch, p_action, e, **tick)
  dense('attention_q', batch, e, e, **tick)
  # Per head (K of them): a 1 x F query against N keys, then N weights x (N, F) values.
  dense('attention_scores', batch * heads, e // heads, n_tokens, batched=True, **tick)
  dense('attention_sum', batch * heads, n_tokens, e // heads, batched=True, **tick)
  dense('attention_out', batch, e, e, **tick)
  depth = m['synapse_depth']
  if depth == 1:
    dense('synapse', batch, e + d, 2 * d, **tick)
  else:
    widths = unet_widths(d, depth)
    dense('synapse/first_projection', batch, e + d, widths[0], **tick)
    for i in range(depth - 1):
      dense(f'synapse/down_{i}', batch, widths[i], widths[i + 1], **tick)
      dense(f'synapse/up_{i}', batch, widths[i + 1], widths[i], **tick)
  memory, hidden = m['memory_length'], m['memory_hidden_dims']
  nlm = dict(batched=True, **tick)
  if m.get('deep_nlms', True):
    dense('nlm_0', batch * d, memory, 2 * hidden, **nlm)
    dense('nlm_1', batch * d, hidden, 2, **nlm)
  else:
    dense('nlm_0', batch * d, memory, 2, **nlm)
  dense('output_projector', batch, p_out, m['out_dims'], tick_output=True, **tick)
  return counter.ops


def forward_flops(cfg):
  """Matmul FLOPs of one forward pass (all ticks)."""
  ticks = cfg['model']['iterations']
  return float(sum(op.flops * (ticks if op.per_tick else 1) for op in layers(cfg)))


def train_flops(cfg, remat='none'):
  """Matmul FLOPs of one train step: forward + backward (+ remat's recomputation)."""
  ticks = cfg['model']['iterations']
  # remat='sqrt' rematerialises every tick and, around them, whole chunks: a
  # chunked tick's forward runs twice more, one of the `rest` ticks once more.
  chunk, n_chunks, rest = ctm.sqrt_remat_chunks(ticks)
  recomputed_ticks = dict(full=ticks, dots=ticks, sqrt=2 * chunk * n_chunks + rest).get(remat, 0)
  total = 0.0
  for op in layers(cfg):
    flops = op.flops * (1 + op.backward)
    if not op.per_tick:
      total += flops
      continue
    recomputed = (remat in ('full', 'sqrt') and not op.tick_output) or (
        remat == 'dots' and op.batched
    )
    total += flops * ticks + (op.flops * recomputed_ticks if recomputed else 0)
  return total
