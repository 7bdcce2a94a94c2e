"""The exported inference artefact: its layout and a loader that needs no
training code (only jax, numpy and orbax).

An artefact directory (written by `python -m ctm_jax.export`) holds:
  model.json           task, model constructor kwargs, the run's config, the
                       inputs' spec (batch dimension symbolic), its source
  variables/           orbax checkpoint of the model's variables only (params,
                       synch indices, batch stats): no optimiser state
  forward.jax_export   the forward pass serialised with `jax.export`
                       (StableHLO), variables and inputs as arguments, any
                       batch size; returns {'predictions' (B, O, T),
                       'certainties' (B, 2, T)}
  checksums.json       size and CRC32 of each file above (ctm_jax/manifest.py),
                       checked before anything is loaded
"""

import json

import jax
import orbax.checkpoint as ocp

from ctm_jax import manifest
from ctm_jax import storage

MODEL_FILE = 'model.json'
VARIABLES_DIR = 'variables'
PROGRAM_FILE = 'forward.jax_export'
FORMAT = 1


def is_artefact(directory: str) -> bool:
  return all(storage.path(storage.join(directory, name)).is_file() for name in (MODEL_FILE, PROGRAM_FILE))


# Bounds on what a model.json may ask for: a tampered or mistaken value is
# refused in one line rather than run (a million ticks, a huge width).
MAX_TICKS = 10_000
MAX_WIDTH = 1 << 20
_FIX = 're-export it with python -m ctm_jax.export'


def read_spec(directory: str) -> dict:
  """model.json, or a one-line ValueError naming the file and the fix."""
  path = storage.join(directory, MODEL_FILE)
  try:
    spec = json.loads(storage.path(path).read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ValueError(f'{path}: not a readable artefact spec ({type(e).__name__}); {_FIX}') from None
  if not isinstance(spec, dict):
    raise ValueError(f'{path}: not a readable artefact spec (a JSON object expected); {_FIX}')
  if spec.get('format') != FORMAT:
    raise ValueError(
        f'{directory}: artefact format {spec.get("format")!r}, this version reads {FORMAT}; '
        're-export it with this version'
    )
  kwargs = spec.get('model_kwargs')
  if not isinstance(kwargs, dict) or not isinstance(spec.get('task'), str) or not isinstance(spec.get('config'), dict):
    raise ValueError(f'{path}: task, model_kwargs or config missing or malformed; {_FIX}')
  for key, bound in (('iterations', MAX_TICKS), ('d_model', MAX_WIDTH), ('d_input', MAX_WIDTH),
                     ('memory_length', MAX_TICKS)):
    value = kwargs.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound):
      raise ValueError(f'{path}: model_kwargs.{key}={value!r} is out of range [1, {bound}]; {_FIX}')
  return spec


def check(directory: str) -> None:
  """ValueError (one line) when the artefact's files differ from its manifest."""
  manifest.check(directory, 'the artefact', _FIX)


def restore_checked(directory: str):
  """The artefact's variables, once its files match its manifest."""
  check(directory)
  return restore_variables(storage.join(directory, VARIABLES_DIR))


def restore_variables(path: str, keys=None):
  """An orbax PyTree checkpoint onto the first local device, whatever mesh wrote it;
  with `keys`, only those top-level entries are read (a train state's variables
  without its optimiser state)."""
  checkpointer = ocp.PyTreeCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = checkpointer.metadata(path).item_metadata.tree
  if keys is not None:
    metadata = {k: metadata[k] for k in keys if k in metadata}
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
  )
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  return checkpointer.restore(
      path,
      args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=keys is not None
      ),
  )


class Program:
  """The exported forward pass with its variables: `program(inputs)` ->
  {'predictions', 'certainties'} for any batch size."""

  def __init__(self, directory: str):
    directory = storage.resolve(directory)
    if not is_artefact(directory):
      raise ValueError(
          f'{directory}: not an exported artefact (no {MODEL_FILE} and {PROGRAM_FILE}); '
          'write one with python -m ctm_jax.export'
      )
    self.spec = read_spec(directory)
    check(directory)
    program = storage.path(storage.join(directory, PROGRAM_FILE)).read_bytes()
    try:
      self.exported = jax.export.deserialize(bytearray(program))
    except Exception as e:  # pylint: disable=broad-except  # flatbuffers raise many types on bad bytes
      raise ValueError(f'{directory}: {PROGRAM_FILE} does not deserialise ({type(e).__name__}); {_FIX}') from None
    self.variables = restore_variables(storage.join(directory, VARIABLES_DIR))

  def __call__(self, inputs):
    return self.exported.call(self.variables, inputs)


def load_program(directory: str) -> Program:
  return Program(directory)
