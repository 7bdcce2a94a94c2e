"""Optional dependencies: the pip extra that brings each, and one line naming
the install to run when one is missing.

The core install trains parity, the image tasks on synthetic or offline data
(digits), mazes, sort and Q&A-MNIST on digits; RL environments, tfds datasets,
PyTorch checkpoints, the Hugging Face Hub, gs:// buckets and the HTTP server need their extras (setup.py keeps the same names).
"""

import importlib
import types

# extra -> the modules it installs (top-level import names).
MODULES = {
    'rl': ('gymnax', 'xminigrid', 'rlax'),
    'tfds': ('tensorflow_datasets',),
    'torch': ('torch',),
    'hub': ('huggingface_hub', 'safetensors', 'pyarrow'),
    'gcs': ('gcsfs',),  # which brings google-cloud-storage (the bucket lock)
    'serve': ('starlette', 'uvicorn'),
    'browser': ('playwright',),  # tools.page_screenshot drives chromium with it
}


class MissingExtra(ValueError):
  """An optional dependency is not installed; the message says what to install."""


def install_line(extra: str) -> str:
  return f'pip install "ctm-jax[{extra}]" (in a checkout: pip install -e ".[{extra}]")'


def module(name: str, needed_by: str) -> types.ModuleType:
  """`name` (a module of an extra), imported; MissingExtra naming `needed_by`
  and the install to run when it is not installed."""
  extra = next(
      extra for extra, names in MODULES.items()
      if any(name == n or name.startswith(n + '.') for n in names)
  )
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise MissingExtra(
        f'{needed_by} needs the {extra!r} extra ({name} is not installed: {e.msg}); '
        f'install it with: {install_line(extra)}'
    ) from None


def require(extra: str, needed_by: str) -> None:
  """Every module of `extra` importable, or MissingExtra (see `module`)."""
  for name in MODULES[extra]:
    module(name, needed_by)
