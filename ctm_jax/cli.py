"""--config for the commands that take one (train, evaluate): absl's parse of
`--config=FILE[:variant]` and `--config.<key>=VALUE`, any mistake in them
reported as one line naming the flag and the fix (exit 2)."""

import difflib
import os
import sys

from absl import flags
from ml_collections.config_flags import config_flags as config_flags_lib

from ctm_jax import configs
from ctm_jax import validation

CONFIG_DIR = os.path.dirname(configs.__file__)
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, configs.DEFAULT)
_NOT_CONFIGS = ('__init__.py', 'common.py', 'models.py')


def flags_parser(prog: str, config_flag, default: str | None = None):
  """absl's `flags_parser` for app.run: parses argv (adding --config=`default`
  when none is given and `default` is set) and loads the config, or prints
  `<prog>: <one line>` and exits 2."""

  def parse(argv):
    if default and not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
      argv = [argv[0], f'--config={default}', *argv[1:]]
    try:
      remaining = flags.FLAGS(argv)
      if config_flag.value is not None:
        config_flag.value.task  # pylint: disable=pointless-statement  # loads the file, applies overrides
      return remaining
    except Exception as e:  # pylint: disable=broad-except  # flag values come from the user
      if any(a.startswith('--config') for a in argv[1:]) or 'config' in str(e):
        message = config_error(argv[1:], e, default)
      else:
        message = validation.first_line(e) or type(e).__name__
      print(f'{prog}: {message}', file=sys.stderr)
      sys.exit(2)

  return parse


def config_error(argv, error, default: str | None = None) -> str:
  """One line for a --config or --config.<key> mistake: what is wrong, and the fix."""
  given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  spec = given[-1] if given else (default or '')
  if not spec:
    return '--config.<key> overrides need --config=FILE[:variant]'
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    known = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and f not in _NOT_CONFIGS)
    return f'--config={spec}: no such config file; the configs are configs/{{{",".join(known)}}}'
  try:
    module = config_flags_lib._LoadConfigModule('ctm_config', path)  # pylint: disable=protected-access
    base = module.get_config(variant or None)
  except Exception as e:  # pylint: disable=broad-except  # the variant or the file itself
    return f'--config={spec}: {validation.first_line(e) or type(e).__name__}'
  keys = dotted_keys(base)
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[2:].split('=', 1)[0]
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f'did you mean {" or ".join(close)}? ' if close else ''
        return (
            f'--{key}: {path} has no such field; {hint}every field and its value is in '
            'the config.json a run writes to its workdir (README.md, "Configs and overrides")'
        )
  lines = str(error).strip().splitlines()
  return lines[-1] if lines else type(error).__name__


def dotted_keys(config, prefix='config') -> list[str]:
  keys = []
  for name, value in config.items():
    keys.append(f'{prefix}.{name}')
    if hasattr(value, 'items'):
      keys += dotted_keys(value, f'{prefix}.{name}')
  return keys
