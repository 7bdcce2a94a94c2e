"""Q&A-MNIST (the reference's tasks/qamnist): digits shown one after another,
then a question about them, then the answer.

The model sees `q_num_images` +- `q_num_images_delta` digits, each for
`q_num_repeats_per_input` ticks, then the question's index and operator
tokens (as many ticks each), then answers over `q_num_answer_steps` ticks.
The loss and accuracy read the answer ticks only, as the reference's train
script does: the image loss (min-CE tick and most certain tick, or the last
tick for the LSTM baseline) against the answer, 0-9.

Dimension glossary: B batch, A answer ticks, S digit slots, Q question tokens.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import compiling
from ctm_jax import evaluators
from ctm_jax.analysis import plots
from ctm_jax.data import qamnist as qa_data
from ctm_jax.models import qamnist as qa_model
from ctm_jax.tasks import base
from ctm_jax.tasks import image

NUM_ANSWERS = qa_data.MODULO


def question_text(question_Q, num_operations: int) -> str:
  """'d0 + d2 - d1 (mod 10)': the question as the tokens ask it."""
  words = []
  for position, token in enumerate(question_Q[: 2 * num_operations + 1]):
    words.append(f'd{int(token)}' if position % 2 == 0 else qa_model.OPERATORS[int(token)])
  return ' '.join(words) + f' (mod {qa_data.MODULO})'


def tick_frames(model, record):
  """What each of an example's own ticks shows: (tick indices, inputs to
  draw: a digit image or a token's text)."""
  phase_T, digit_T, token_T = schedule = model.schedule(record['digits'].shape[0], record['question'].shape[0])
  active_T = np.asarray(qa_model.active_ticks(
      schedule, np.asarray([record['num_digits']]), np.asarray([record['num_operations']])
  ))[:, 0]
  ticks, shown = [], []
  for t in np.flatnonzero(active_T):
    ticks.append(int(t))
    if phase_T[t] == qa_model.PHASE_DIGIT:
      shown.append(record['digits'][digit_T[t]])
    elif phase_T[t] == qa_model.PHASE_QUESTION:
      token = int(record['question'][token_T[t]])
      shown.append(f'd{token}' if token_T[t] % 2 == 0 else qa_model.OPERATORS[token])
    else:
      shown.append('?')
  return ticks, shown, phase_T


def tracked_arrays(model, variables, inputs) -> dict[str, jax.Array]:
  """What a question gif draws, from a tracked forward: answer probabilities
  `probs_BxTxC`, `certainty_BxT`, head-averaged attention `attention_BxTxN`
  (digit ticks only)."""
  output = model.apply(variables, inputs, track=True)
  return {
      'probs_BxTxC': jax.nn.softmax(jnp.moveaxis(output.predictions.astype(jnp.float32), 1, 2), axis=-1),
      'certainty_BxT': output.certainties[:, 1].astype(jnp.float32),
      'attention_BxTxN': evaluators.head_mean_attention(output),
  }


def draw_question(model, record, probs_TxC, certainty_T, attention_TxN, path, answer, title) -> str:
  """The gif of one example's own ticks (padding ticks left out)."""
  ticks, shown, phase_T = tick_frames(model, record)
  side = int(round(np.sqrt(attention_TxN.shape[-1])))
  attention = [attention_TxN[t].reshape(side, side) if phase_T[t] == qa_model.PHASE_DIGIT else None for t in ticks]
  return question_gif(
      shown,
      attention,
      np.asarray(probs_TxC)[ticks],
      np.asarray(certainty_T)[ticks],
      path,
      answer=answer,
      question=question_text(record['question'], int(record['num_operations'])),
      title=title,
  )


class QuestionGifs(evaluators.RecordGifs):
  """`question_<step>_<i>.gif` for the first `count` held-out questions:
  each of the example's own ticks, the digit shown under the attention (or
  the question token), every answer's probability and the certainty."""

  input_keys = qa_model.QA_INPUT_KEYS

  def __init__(self, context, count: int):
    super().__init__(context, count, evaluators.tracked_step(tracked_arrays))

  def draw(self, index, record, tracked, step):
    draw_question(
        self.context.model,
        record,
        tracked['probs_BxTxC'],
        tracked['certainty_BxT'],
        tracked['attention_BxTxN'],
        os.path.join(self.context.plot_dir, f'question_{step:07d}_{index}.gif'),
        answer=int(record['targets']),
        title=f'step {step}, eval question {index}: ',
    )


def _parse_question(text: str, source: str, dataset: str):
  """'a.png b.png ? d0 + d1 - d0 [= 7]' -> (digits (S, H, W, 1), tokens (Q,), answer or None)."""
  pictures, mark, question = text.partition('?')
  question, _, answer = question.partition('=')
  paths = pictures.split()
  words = question.replace('+', ' + ').replace('-', ' - ').split()
  if not mark or not paths or not words:
    raise ValueError(f"--input={source}: expected 'a.png b.png ? d0 + d1 - d0' (pictures, '?', the question)")
  tokens = []
  for position, word in enumerate(words):
    if position % 2:
      if word not in ('+', '-'):
        raise ValueError(f'--input={source}: {word!r} where an operator (+ or -) belongs')
      tokens.append(-1 if word == '+' else -2)
    elif word.startswith('d') and word[1:].isdigit():
      tokens.append(int(word[1:]))
    else:
      raise ValueError(f'--input={source}: {word!r} where a digit (d0, d1, ...) belongs')
  digits = []
  for path in paths:
    base.check_input_file(path, f'--input={source}: the picture {path}')
    try:
      digits.append(qa_data.read_digit(path, dataset))
    except (OSError, ValueError) as e:
      raise ValueError(f'--input={source}: cannot read the picture {path} ({e})') from None
  try:
    value = int(answer) if answer.strip() else None
  except ValueError:
    raise ValueError(f'--input={source}: the answer after = must be a digit, got {answer.strip()!r}') from None
  return np.stack(digits), np.asarray(tokens, np.int32), value


def _positive(config, key, minimum=1):
  value = config[key]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'config.{key}={value!r}: must be an integer of at least {minimum}')
  return value


def slots_and_tokens(config) -> tuple[int, int]:
  """(S, Q): the most digits and question tokens of any example."""
  digits = qa_data.count_range(config.q_num_images, config.q_num_images_delta)[1]
  operations = qa_data.count_range(config.q_num_operations, config.q_num_operations_delta)[1]
  return digits, 2 * operations + 1


@base.register
class QAMNIST(base.Task, base.Supervised, base.Predicts, base.ImportsReference):
  name = 'qamnist'
  config_keys = frozenset({
      'dataset', 'data_dir', 'q_num_images', 'q_num_images_delta', 'q_num_repeats_per_input',
      'q_num_operations', 'q_num_operations_delta', 'q_num_answer_steps', 'n_attention_gifs',
  })
  identity_keys = (
      'dataset', 'q_num_images', 'q_num_images_delta', 'q_num_repeats_per_input',
      'q_num_operations', 'q_num_operations_delta', 'q_num_answer_steps',
  )
  model_class = qa_model.ContinuousThoughtMachineQAMNIST
  baselines = {'lstm': qa_model.LSTMQAMNIST}
  reference_model_field = 'model_type'
  # The Q&A-MNIST classes fix these; the script has no flags for them.
  reference_arg_defaults = {'backbone_type': 'none', 'positional_embedding_type': 'none'}

  def validate(self, config):
    if config.dataset not in qa_data.DATASETS:
      raise ValueError(
          f'config.dataset={config.dataset!r}: Q&A-MNIST reads one of {", ".join(qa_data.DATASETS)} '
          "('digits': scikit-learn's bundled digits, no download)"
      )
    for key, delta in (('q_num_images', 'q_num_images_delta'), ('q_num_operations', 'q_num_operations_delta')):
      n, d = _positive(config, key), _positive(config, delta, 0)
      if n - d < 1:
        raise ValueError(f'config.{delta}={d}: {key} - {delta} must be at least 1 (got {n - d})')
    _positive(config, 'q_num_repeats_per_input')
    _positive(config, 'n_attention_gifs', 0)
    _positive(config, 'q_num_answer_steps')
    slots, _ = slots_and_tokens(config)
    if slots > qa_model.MAX_INDEX:
      raise ValueError(f'config.q_num_images={config.q_num_images}: at most {qa_model.MAX_INDEX} digits can be indexed')

  def check_data(self, config):
    for split in ('train', 'eval'):
      qa_data.base_images(config.dataset, split, config.get('data_dir', ''))

  def record_spec(self, config):
    slots, tokens = slots_and_tokens(config)
    size = qa_data.image_size(config.dataset)
    return {
        'digits': ((slots, size, size, 1), np.dtype(np.float32)),
        'question': ((tokens,), np.dtype(np.int32)),
        'num_digits': ((), np.dtype(np.int32)),
        'num_operations': ((), np.dtype(np.int32)),
        'targets': ((), np.dtype(np.int32)),
    }

  def train_source(self, config):
    return qa_data.source(config, 'train')

  def eval_source(self, config):
    return qa_data.source(config, 'eval')

  def synthetic_batch(self, config, batch_size, seed):
    rng = np.random.default_rng(seed)
    slots, tokens = slots_and_tokens(config)
    size = qa_data.image_size(config.dataset)
    question = rng.integers(0, slots, (batch_size, tokens)).astype(np.int32)
    question[:, 1::2] = -rng.integers(1, 3, (batch_size, tokens // 2))
    return {
        'digits': rng.standard_normal((batch_size, slots, size, size, 1)).astype(np.float32),
        'question': question,
        'num_digits': np.full(batch_size, slots, np.int32),
        'num_operations': np.full(batch_size, tokens // 2, np.int32),
        'targets': rng.integers(0, NUM_ANSWERS, batch_size).astype(np.int32),
    }

  def example_batch(self, config):
    batch = super().example_batch(config)
    batch['question'] = jnp.zeros_like(batch['question'])
    return batch

  def model_kwargs(self, config):
    slots, tokens = slots_and_tokens(config)
    repeats, answer = config.q_num_repeats_per_input, config.q_num_answer_steps
    return {
        **config.model.to_dict(),
        'out_dims': NUM_ANSWERS,
        'prediction_reshaper': (-1,),
        # The reference's `iterations` is unused: the ticks follow the question.
        'iterations': (slots + tokens) * repeats + answer,
        'iterations_per_digit': repeats,
        'iterations_per_question_part': repeats,
        'iterations_for_answering': answer,
    }

  def model_inputs(self, batch):
    return {key: batch[key] for key in qa_model.QA_INPUT_KEYS}

  def loss(self, config, output, batch):
    answer = config.q_num_answer_steps
    loss, most_certain_B = image.image_classification_loss(
        output.predictions[..., -answer:], output.certainties[..., -answer:], batch['targets'],
        config.use_most_certain,
    )
    return loss, {'most_certain_B': most_certain_B}

  def correct(self, output, batch):
    """Every tick's answer against the target, (B, T): the answer ticks are the last A."""
    return (jnp.argmax(output.predictions, axis=1) == batch['targets'][:, None]).astype(jnp.float32)

  def scored(self, config, output, batch):
    return self.correct(output, batch)[:, -config.q_num_answer_steps:]

  def eval_arrays(self, config, output, batch, aux):
    arrays = super().eval_arrays(config, output, batch, aux)
    arrays['certainty_BxT'] = arrays['certainty_BxT'][:, -config.q_num_answer_steps:]
    return arrays

  evals = {
      **base.Supervised.evals,
      'question_gifs': lambda context: (
          QuestionGifs(context, context.config.n_attention_gifs)
          if context.config.n_attention_gifs else None
      ),
  }
  default_evals = ('tick_accuracy', 'adaptive_compute', 'question_gifs')

  def describe(self, config, prediction_O):
    return f'answer {int(np.argmax(prediction_O))}'

  def read_input(self, config, source):
    """A question: 'a.png b.png ? d0 + d1 - d0' (digit pictures, light ink on
    dark as MNIST, then the question: d<k> is the k-th picture, operators + and
    -; optionally '= 7', the answer), as text or in a file; or a `.npz` of
    `digits` (S, H, W, 1) and `question` (Q,) tokens (optionally `targets`)."""
    dataset = config.get('dataset', 'mnist')
    if source.lower().endswith('.npz'):
      try:
        with np.load(source, allow_pickle=False) as data:
          arrays = {k: np.asarray(data[k]) for k in data.files}
      except (OSError, ValueError) as e:
        raise ValueError(f'--input={source}: cannot read it as a .npz ({e})') from None
      if 'digits' not in arrays or 'question' not in arrays:
        raise ValueError(f'--input={source}: a .npz needs `digits` (S, H, W, 1) and `question` (Q,)')
      digits, question = arrays['digits'].astype(np.float32), arrays['question'].astype(np.int32)
      answer = int(arrays['targets']) if 'targets' in arrays else None
    else:
      digits, question, answer = _parse_question(base.text_input(source), source, dataset)
    if digits.ndim == 3:
      digits = digits[..., None]
    size = qa_data.image_size(dataset)
    if digits.ndim != 4 or digits.shape[1:] != (size, size, 1) or question.ndim != 1 or len(question) % 2 != 1:
      raise ValueError(
          f'--input={source}: digits {digits.shape} and question {question.shape}; the model reads '
          f'(S, {size}, {size}, 1) digits and an odd number of tokens'
      )
    indices = question[0::2]
    if (indices < 0).any() or (indices >= len(digits)).any() or not np.isin(question[1::2], [-1, -2]).all():
      raise ValueError(f'--input={source}: question tokens {question.tolist()} do not alternate digit indices and operators')
    inputs = {
        'digits': digits[None],
        'question': question[None],
        'num_digits': np.array([len(digits)], np.int32),
        'num_operations': np.array([len(question) // 2], np.int32),
    }
    batch = {'inputs': inputs}
    if answer is not None:
      batch['targets'] = np.array([answer], np.int32)
    return batch

  def prediction_gif(self, config, model, variables, batch, path):
    inputs = batch['inputs']
    arrays = jax.device_get(compiling.jit(functools.partial(tracked_arrays, model))(variables, inputs))
    return draw_question(
        model,
        {k: np.asarray(v[0]) for k, v in inputs.items()},
        arrays['probs_BxTxC'][0],
        arrays['certainty_BxT'][0],
        arrays['attention_BxTxN'][0],
        path,
        answer=int(batch['targets'][0]) if 'targets' in batch else None,
        title=f'{os.path.basename(path)}: ',
    )

  def matches_reference_args(self, args):
    return 'q_num_images' in args

  def reference_model_kwargs(self, args):
    repeats = int(base.required_arg(args, 'q_num_repeats_per_input', self.name))
    answer = int(base.required_arg(args, 'q_num_answer_steps', self.name))
    kwargs = {
        'out_dims': NUM_ANSWERS,
        'prediction_reshaper': [-1],
        'iterations_per_digit': repeats,
        'iterations_per_question_part': repeats,
        'iterations_for_answering': answer,
        'dropout_nlm': None,
    }
    if args.get(self.reference_model_field) == 'lstm':
      kwargs.update(backbone_type='none', positional_embedding_type='none', num_layers=1)
    return kwargs


# ---------------------------------------------------------------------------
# The task's picture.


def question_gif(
    frames_in,
    attention_Txhxw,
    probs_TxC,
    certainty_T,
    path,
    answer: int | None = None,
    question: str = '',
    title: str = '',
    frame_ms: int = 250,
) -> str:
  """One frame per tick of an input that arrives over the ticks (Q&A-MNIST):
  left, what this tick shows (`frames_in[t]`: an (H, W, C) image, drawn under
  the head-averaged attention `attention_Txhxw[t]` where that is not None, or
  a text such as an operator), right, the probability of every answer (the
  right one green) and the certainty; the question above."""
  ticks, classes = np.shape(probs_TxC)
  fig, (ax_in, ax_probs) = plots.subplots(1, 2, figsize=(6.4, 3.4), dpi=80)
  image = ax_in.imshow(np.zeros((2, 2)), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  overlay = ax_in.imshow(np.zeros((2, 2)), cmap='inferno', alpha=0.0, interpolation='bilinear')
  label = ax_in.text(0.5, 0.5, '', ha='center', va='center', fontsize=26, transform=ax_in.transAxes, color='black')
  ax_in.set_axis_off()
  bars = ax_probs.bar(np.arange(classes), probs_TxC[0], color='tab:blue')
  ax_probs.set_ylim(0, 1)
  ax_probs.set_xticks(np.arange(classes))
  ax_probs.set_ylabel('probability')
  heading = fig.suptitle('', fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.82))
  frames = []
  for t in range(ticks):
    shown = frames_in[t]
    if isinstance(shown, str):
      image.set_data(np.ones((2, 2)))
      overlay.set_alpha(0.0)
      label.set_text(shown)
    else:
      height, width = np.shape(shown)[:2]
      image.set_data(plots.unit_range(shown))
      image.set_extent((-0.5, width - 0.5, height - 0.5, -0.5))
      label.set_text('')
      if attention_Txhxw[t] is None:
        overlay.set_alpha(0.0)
      else:
        overlay.set_data(attention_Txhxw[t])
        overlay.set_extent((-0.5, width - 0.5, height - 0.5, -0.5))
        overlay.set_clim(float(np.min(attention_Txhxw[t])), float(np.max(attention_Txhxw[t])))
        overlay.set_alpha(0.55)
    for c, bar in enumerate(bars):
      bar.set_height(float(probs_TxC[t, c]))
      bar.set_color('tab:green' if c == answer else 'tab:blue')
    truth = '' if answer is None else f', answer {answer}'
    heading.set_text(
        f'{question}\n{title}tick {t + 1}/{ticks}, certainty {float(certainty_T[t]):.3f}{truth}'
    )
    frames.append(plots.frame(fig))
  return plots.save_gif(frames, path, frame_ms)
