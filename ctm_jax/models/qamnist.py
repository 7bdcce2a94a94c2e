"""The Q&A-MNIST CTM (the reference's ContinuousThoughtMachineQAMNIST).

Its input arrives over the ticks in three phases: digit ticks (each MNIST
digit shown `iterations_per_digit` ticks, attended to like an image), question
ticks (index and operator tokens in turn, `iterations_per_question_part` ticks
each, their embeddings fed straight to the synapses) and answer ticks (zeros).
The digits go through the backbone once, all together; each digit tick attends
to its own digit's keys and values. The action synch is updated every tick.

A batch holds `QAInputs`: its examples may have fewer digits and question
tokens than the batch's longest; their missing ticks are padding, inactive
ticks that leave the example's state as it was (TickInputs.active_B), so each
example runs exactly the reference's ticks for its own question.

Dimension glossary:
  B batch   S digit slots   Q question tokens   T ticks   E d_input
  H, W, C digit image   K heads   N tokens per digit   F head width
"""

import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ctm_jax.models import backbones
from ctm_jax.models import ctm
from ctm_jax.models import layers
from ctm_jax.models import lstm

# The reference's index embedding: a fixed sinusoidal table of 50 positions.
MAX_INDEX = 50
INDEX_EMBEDDING_KEY = 'index_backbone.embedding'
# Operator tokens: -1 '+', -2 '-' (embedding rows 0 and 1).
OPERATORS = {-1: '+', -2: '-'}
QA_INPUT_KEYS = ('digits', 'question', 'num_digits', 'num_operations')

PHASE_DIGIT, PHASE_QUESTION, PHASE_ANSWER = 0, 1, 2


def index_embedding_table(d_input: int) -> np.ndarray:
  """(50, E): even columns sin(pos * exp(-2i ln(10000) / E)), odd columns cos."""
  position_Px1 = np.arange(MAX_INDEX, dtype=np.float32)[:, None]
  div_half = np.exp(np.arange(0, d_input, 2, dtype=np.float32) * (-math.log(10000.0) / d_input))
  table = np.zeros((MAX_INDEX, d_input), np.float32)
  table[:, 0::2] = np.sin(position_Px1 * div_half)
  table[:, 1::2] = np.cos(position_Px1 * div_half[: d_input // 2])
  return table


def tick_schedule(slots: int, tokens: int, per_digit: int, per_part: int, answer: int):
  """Static per-tick schedule of a batch of `slots` digits and `tokens`
  question tokens: (phase_T, digit_T, token_T), numpy int32. digit_T is the
  digit shown (0 outside digit ticks); token_T the question position (0
  outside question ticks)."""
  digit_ticks, question_ticks = slots * per_digit, tokens * per_part
  total = digit_ticks + question_ticks + answer
  t_T = np.arange(total)
  phase_T = np.where(
      t_T < digit_ticks, PHASE_DIGIT, np.where(t_T < digit_ticks + question_ticks, PHASE_QUESTION, PHASE_ANSWER)
  ).astype(np.int32)
  digit_T = np.where(phase_T == PHASE_DIGIT, t_T // per_digit, 0).astype(np.int32)
  token_T = np.where(phase_T == PHASE_QUESTION, (t_T - digit_ticks) // per_part, 0).astype(np.int32)
  return phase_T, digit_T, token_T


def active_ticks(schedule, num_digits_B, num_operations_B):
  """(T, B) bool: the ticks each example really has; padding ticks False."""
  phase_T, digit_T, token_T = schedule
  digit_TxB = digit_T[:, None] < num_digits_B[None, :]
  token_TxB = token_T[:, None] < (2 * num_operations_B[None, :] + 1)
  phase_Tx1 = phase_T[:, None]
  return jnp.where(
      phase_Tx1 == PHASE_DIGIT, digit_TxB, jnp.where(phase_Tx1 == PHASE_QUESTION, token_TxB, True)
  )


def check_qa_input(x) -> None:
  """Raises ValueError for a batch that is not a Q&A model's input dict."""
  if not isinstance(x, dict) or set(x) != set(QA_INPUT_KEYS):
    got = sorted(x) if isinstance(x, dict) else type(x).__name__
    raise ValueError(f'x={got}: Q&A-MNIST models take a dict of {", ".join(QA_INPUT_KEYS)}')
  digits, question = x['digits'], x['question']
  if digits.ndim != 5 or not jnp.issubdtype(digits.dtype, jnp.floating):
    raise ValueError(f"x['digits'].shape={tuple(digits.shape)}: expected float (B, S, H, W, C) digits")
  if question.ndim != 2 or not jnp.issubdtype(question.dtype, jnp.integer):
    raise ValueError(f"x['question'].shape={tuple(question.shape)}: expected int (B, Q) tokens")
  if question.shape[1] % 2 != 1:
    raise ValueError(
        f"x['question'].shape={tuple(question.shape)}: Q = 2 x operations + 1 tokens (index, operator, index, ...)"
    )
  batch = digits.shape[0]
  for name in ('num_digits', 'num_operations'):
    if x[name].shape != (batch,):
      raise ValueError(f"x[{name!r}].shape={tuple(x[name].shape)}: expected ({batch},)")


class OperatorEmbeddings(nn.Module):
  """`embedding` (2, E), N(0, 1) as torch's nn.Embedding; token -1 reads row 0, -2 row 1."""

  d_input: int

  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(len(OPERATORS), self.d_input, embedding_init=nn.initializers.normal(1.0), name='embedding')(
        jnp.clip(-tokens - 1, 0, len(OPERATORS) - 1)
    )


def question_embeddings(module, question_BxQ):
  """(B, Q, E): even positions the index table's row, odd the operator's
  embedding (`operator_backbone` created in `module`)."""
  table = jnp.asarray(index_embedding_table(module.d_input))
  index_BxQxE = table[jnp.clip(question_BxQ, 0, MAX_INDEX - 1)]
  operator_BxQxE = OperatorEmbeddings(module.d_input, name='operator_backbone')(question_BxQ)
  is_index_Q = np.arange(question_BxQ.shape[1]) % 2 == 0
  return jnp.where(is_index_Q[None, :, None], index_BxQxE, operator_BxQxE)


def kv_projection(module):
  """The reference's kv_proj (Linear, LayerNorm) as one callable, created in `module`."""
  linear = layers.Linear(module.d_input, dtype=module.dtype, name='kv_proj_0')
  norm = layers.LayerNorm(dtype=module.dtype, name='kv_proj_1')
  return lambda tokens: norm(linear(tokens))


def digit_tokens(module, x, train, kv_proj):
  """(B, S, N, E): each digit through `backbone_digit` (padding digits left
  out of the batch statistics) and `kv_proj`."""
  digits = x['digits']
  batch, slots = digits.shape[:2]
  images = digits.reshape(batch * slots, *digits.shape[2:])
  mask_BS = (jnp.arange(slots)[None, :] < x['num_digits'][:, None]).reshape(-1)
  features = backbones.MNISTBackbone(module.d_input, module.dtype, name='backbone_digit')(
      images, train, mask_BS if train else None
  )
  kv = kv_proj(features.reshape(batch * slots, -1, features.shape[-1]))
  return kv.reshape(batch, slots, *kv.shape[1:])


def example_qa_input(channels: int = 1, size: int = 28):
  """A batch of one: one digit, the question 'digit 0'."""
  return {
      'digits': jnp.zeros((1, 1, size, size, channels), jnp.float32),
      'question': jnp.zeros((1, 1), jnp.int32),
      'num_digits': jnp.ones((1,), jnp.int32),
      'num_operations': jnp.zeros((1,), jnp.int32),
  }


def qa_tick_inputs(module, x, train, embed_through_kv_proj: bool):
  """(per-tick, fixed) TickInputs of a Q&A batch: the digits' key/value sets,
  per tick the digit shown, whether to attend, the question embedding (zeros
  on digit and answer ticks; through kv_proj first for the LSTM baseline) and
  which examples are active."""
  batch = x['digits'].shape[0]
  kv_proj = kv_projection(module)
  kv_BxSxNxE = digit_tokens(module, x, train, kv_proj)
  slots, tokens = kv_BxSxNxE.shape[1], kv_BxSxNxE.shape[2]
  k, v = ctm.project_kv(module, kv_BxSxNxE.reshape(batch * slots, tokens, -1))
  key_sets, value_sets = (a.reshape(batch, slots, *a.shape[1:]) for a in (k, v))
  phase_T, digit_T, token_T = schedule = module.schedule(slots, x['question'].shape[1])
  emb_BxQxE = question_embeddings(module, x['question']).astype(module.dtype)
  if embed_through_kv_proj:
    emb_BxQxE = kv_proj(emb_BxQxE)
  is_question_T = phase_T == PHASE_QUESTION
  features_TxBxE = jnp.where(
      is_question_T[:, None, None], jnp.moveaxis(jnp.take(emb_BxQxE, token_T, axis=1), 1, 0), 0
  )
  per_tick = ctm.TickInputs(
      features_BxE=features_TxBxE,
      key_set=digit_T,
      attend=phase_T == PHASE_DIGIT,
      active_B=active_ticks(schedule, x['num_digits'], x['num_operations']),
  )
  fixed = ctm.TickInputs(key_sets_BxSxKxNxF=key_sets, value_sets_BxSxKxNxF=value_sets)
  return per_tick, fixed


class QAMNISTMixin:
  """What the Q&A-MNIST CTM and LSTM share: the schedule (their
  `iterations_per_*` fields), the input, the constructor options the
  reference's classes fix (`fixed_options`), and the question embeddings,
  fed as they are (CTM) or through kv_proj (LSTM)."""

  fixed_options: ClassVar[dict] = {}
  embed_through_kv_proj: ClassVar[bool] = False

  def __post_init__(self):
    for field, value in self.fixed_options.items():
      object.__setattr__(self, field, value)
    _check_schedule_options(self)
    super().__post_init__()

  def check_input(self, x) -> None:
    check_qa_input(x)

  def tick_inputs(self, x, train):
    return qa_tick_inputs(self, x, train, embed_through_kv_proj=self.embed_through_kv_proj)

  def schedule(self, slots: int, tokens: int):
    """`tick_schedule` of `slots` digits and `tokens` question tokens."""
    return tick_schedule(
        slots,
        tokens,
        self.iterations_per_digit,
        self.iterations_per_question_part,
        self.iterations_for_answering,
    )

  def num_ticks(self, slots: int, tokens: int) -> int:
    return len(self.schedule(slots, tokens)[0])

  def reference_constants(self) -> dict[str, np.ndarray]:
    """Buffers the reference's state_dict holds that are fixed functions of
    the constructor: checked and dropped on import, written on export."""
    return {INDEX_EMBEDDING_KEY: index_embedding_table(self.d_input)}

  @classmethod
  def example_input(cls, state_dict, model_kwargs):
    del model_kwargs
    return example_qa_input(int(state_dict['backbone_digit.layers.0.weight'].shape[1]))


def _check_schedule_options(model):
  for field in ('iterations_per_digit', 'iterations_per_question_part', 'iterations_for_answering'):
    value = getattr(model, field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{field}={value!r}: must be a positive integer')


class ContinuousThoughtMachineQAMNIST(QAMNISTMixin, ctm.ContinuousThoughtMachine):
  """Constructor as the reference's (`backbone_type` and
  `positional_embedding_type` are forced to 'none'; `iterations` is unused:
  the ticks are the digits' + the question's + the answer's). Input: a dict
  {'digits' (B, S, H, W, C), 'question' (B, Q) int (index >= 0, operator -1
  '+' / -2 '-'), 'num_digits' (B,), 'num_operations' (B,)} where each example
  uses its first num_digits digits and 2 num_operations + 1 tokens."""

  iterations_per_digit: int = 1
  iterations_per_question_part: int = 1
  iterations_for_answering: int = 1

  decay_clamp_in_graph: ClassVar[bool] = False

  fixed_options: ClassVar[dict] = {'backbone_type': 'none', 'positional_embedding_type': 'none'}

  def outputs(self, final, per_tick, track, inputs=None):
    out = super().outputs(final, per_tick, track)
    if track:
      out = out.replace(tracking=qa_tracking(out.tracking, inputs, self.iterations_for_answering))
    return out


def qa_tracking(tracking: ctm.Tracking, inputs: ctm.TickInputs, answer_ticks: int) -> ctm.Tracking:
  """As the reference tracks: attention on digit ticks only, and the
  question embeddings fed on question ticks, (T_question, B, E)."""
  attend_T = np.asarray(inputs.attend)
  question_T = ~attend_T
  question_T[len(question_T) - answer_ticks :] = False
  return tracking.replace(
      attention=None if tracking.attention is None else tracking.attention[attend_T],
      embeddings=inputs.features_BxE[question_T],
  )


class LSTMQAMNIST(QAMNISTMixin, lstm.LSTMBaseline):
  """The reference's Q&A-MNIST LSTM baseline (models/lstm_qamnist.py): one
  torch.nn.LSTMCell (`lstm_cell/weight_ih` ...), (D,) start states, the CTM
  variant's digit backbone and attention on digit ticks; on question ticks the
  embedding goes through kv_proj and straight into the cell; zeros on answer
  ticks. Same input as ContinuousThoughtMachineQAMNIST. `backbone_type`,
  `positional_embedding_type` and `num_layers` are fixed ('none', 'none', 1)."""

  iterations_per_digit: int = 1
  iterations_per_question_part: int = 1
  iterations_for_answering: int = 1

  single_cell: ClassVar[bool] = True

  fixed_options: ClassVar[dict] = {'backbone_type': 'none', 'positional_embedding_type': 'none', 'num_layers': 1}
  embed_through_kv_proj: ClassVar[bool] = True

  def tracking(self, per_tick_out, inputs):
    post_TxBxD = per_tick_out['post_activations']
    tracking = ctm.Tracking(
        pre_activations=post_TxBxD,  # the reference tracks h twice
        post_activations=post_TxBxD,
        attention=per_tick_out['attention'],
        synch_out=None,
        synch_action=None,
    )
    return qa_tracking(tracking, inputs, self.iterations_for_answering)
