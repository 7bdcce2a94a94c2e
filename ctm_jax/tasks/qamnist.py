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

import numpy as np

import jax.numpy as jnp

from ctm_jax.data import qamnist as qa_data
from ctm_jax.models import qamnist as qa_model
from ctm_jax.tasks import base
from ctm_jax.tasks import image

NUM_ANSWERS = qa_data.MODULO


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
class QAMNIST(base.Task):
  name = 'qamnist'
  config_keys = frozenset({
      'dataset', 'data_dir', 'q_num_images', 'q_num_images_delta', 'q_num_repeats_per_input',
      'q_num_operations', 'q_num_operations_delta', 'q_num_answer_steps',
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

  def describe(self, config, prediction_O):
    return f'answer {int(np.argmax(prediction_O))}'

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

