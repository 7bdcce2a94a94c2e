"""The reference's models from the Hugging Face Hub, or from a folder of its files.

A Hub model repo (`hf://ORG/NAME[@REVISION]`, e.g. hf://SakanaAI/ctm-imagenet)
holds what the reference's PyTorchModelHubMixin writes: `config.json` (the
constructor's kwargs) and `model.safetensors` (the state_dict; tensors that
share memory are stored once, the file's metadata naming each dropped name's
kept twin). huggingface_hub downloads them (its cache, HF_HOME,
HF_HUB_OFFLINE and token are the library's) and safetensors reads them into
numpy: no torch on this path. Both come with the `hub` extra.
"""

import json
import os
from typing import Any

import numpy as np

from ctm_jax import extras
from ctm_jax import outputs

PREFIX = 'hf://'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
CARD_FILE = 'README.md'


def is_hub(source: str) -> bool:
  return str(source).startswith(PREFIX)


def parse(source: str) -> tuple[str, str | None]:
  """(repo_id, revision) of `hf://ORG/NAME[@REVISION]`; ValueError naming the form."""
  body = source[len(PREFIX):]
  repo_id, _, revision = body.partition('@')
  parts = repo_id.split('/')
  if len(parts) != 2 or not all(parts) or (_ and not revision):
    raise ValueError(f'{source}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION')
  return repo_id, revision or None


def download(source: str, filename: str) -> str:
  """The local path of `filename` in the Hub repo `source`, from the Hub cache
  or downloaded into it; one-line ValueError naming the repo, the file and the fix."""
  return fetch(source, filename, lambda hub, repo_id, revision: hub.hf_hub_download(
      repo_id, filename, revision=revision))


def fetch(source: str, what: str, get, fix_offline: str = ''):
  """`get(huggingface_hub, repo_id, revision)` for the repo `source`, its
  errors as one ValueError line naming the repo, `what` was fetched and the
  fix (`fix_offline`: the command that fetches it, default `hf download REPO`)."""
  repo_id, revision = parse(source)
  hub = extras.module('huggingface_hub', source)
  errors = extras.module('huggingface_hub.errors', source)
  where = f'{source}: {what}'
  try:
    return get(hub, repo_id, revision)
  except errors.GatedRepoError:
    raise ValueError(
        f'{where}: the repo is gated; accept its terms on huggingface.co/{repo_id} and log in '
        '(hf auth login, or HF_TOKEN)'
    ) from None
  except errors.RepositoryNotFoundError:
    raise ValueError(
        f'{where}: no such repo on the Hub, or a private one (log in with hf auth login, or set HF_TOKEN)'
    ) from None
  except errors.RevisionNotFoundError:
    raise ValueError(f'{where}: the repo has no revision {revision!r}') from None
  except errors.LocalEntryNotFoundError:
    raise ValueError(
        f'{where}: not in the Hub cache and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1 or '
        f'no network); fetch it once online, e.g. {fix_offline or "hf download " + repo_id}'
    ) from None
  except errors.EntryNotFoundError:
    raise ValueError(f'{where}: the repo has no such file') from None
  except (errors.HfHubHTTPError, OSError) as e:  # a download cut off, a full disk
    raise ValueError(f'{where}: download failed ({_first_line(e)}); run again to resume it') from None


def _first_line(error: BaseException) -> str:
  """An exception's first message line, or its type's name: for one-line errors."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file as numpy arrays, tensors stored once under a shared
  name given back under each of their names (the metadata's map). Reading
  runs no code from the file."""
  safetensors = extras.module('safetensors', path)
  try:
    with safetensors.safe_open(path, framework='np') as f:
      tensors = {name: f.get_tensor(name) for name in f.keys()}
      metadata = f.metadata() or {}
  except (OSError, ValueError, TypeError, safetensors.SafetensorError) as e:
    raise ValueError(f'{path}: not a readable safetensors file ({_first_line(e)})') from None
  for dropped, kept in metadata.items():
    if kept in tensors and dropped not in tensors:
      tensors[dropped] = tensors[kept]
  return tensors


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
  """--model_kwargs: a JSON object, or @FILE holding one; {} when not given."""
  if not text:
    return {}
  source = text
  if text.startswith('@'):
    if os.path.exists(text[1:]) and not os.path.isfile(text[1:]):
      raise ValueError(f'--model_kwargs={source}: {text[1:]} is not a regular file; give a JSON file')
    try:
      with open(text[1:]) as f:
        text = f.read(1 << 20)
    except OSError as e:
      raise ValueError(f'--model_kwargs={source}: cannot read {text[1:]} ({e.strerror})') from None
  try:
    kwargs = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'--model_kwargs={source}: not JSON ({e.msg} at character {e.pos})') from None
  if not isinstance(kwargs, dict):
    raise ValueError(f'--model_kwargs={source}: expected a JSON object of constructor kwargs')
  return kwargs


def is_model_folder_or_file(source: str) -> bool:
  """Whether `source` is read here: a Hub repo, a folder with model.safetensors, a .safetensors file."""
  return (
      is_hub(source)
      or str(source).endswith('.safetensors')
      or os.path.isfile(os.path.join(source, WEIGHTS_FILE))
  )


def read_model(source: str, model_kwargs: dict | None = None) -> tuple[dict, dict[str, np.ndarray], str]:
  """(constructor kwargs, state_dict, where the weights came from) of a Hub
  repo, a local folder of config.json + model.safetensors, or a bare
  .safetensors file. `model_kwargs` add to or override config.json's (a bare
  file has none)."""
  if is_hub(source):
    weights = download(source, WEIGHTS_FILE)
    config_path = download(source, CONFIG_FILE) if not model_kwargs else _optional(source)
  elif os.path.isdir(source):
    weights = os.path.join(source, WEIGHTS_FILE)
    config_path = os.path.join(source, CONFIG_FILE)
    if not os.path.isfile(weights):
      raise ValueError(f'{source}: no {WEIGHTS_FILE} in the folder')
  else:
    weights, config_path = source, None
    if not os.path.isfile(weights):
      raise ValueError(f'{source}: no such file')
  kwargs = _read_kwargs_file(config_path) if config_path and os.path.lexists(config_path) else {}
  kwargs = {**kwargs, **(model_kwargs or {})}
  if not kwargs:
    raise ValueError(
        f'{source}: no {CONFIG_FILE} beside the weights; give the constructor kwargs with '
        '--model_kwargs=JSON or --model_kwargs=@FILE.json'
    )
  return kwargs, read_safetensors(weights), source if is_hub(source) else os.path.abspath(weights)


def read_kwargs(source: str) -> dict:
  """The constructor kwargs (config.json) of a Hub repo or a local folder, without the weights."""
  if is_hub(source):
    path = download(source, CONFIG_FILE)
  elif os.path.isdir(source):
    path = os.path.join(source, CONFIG_FILE)
  else:
    raise ValueError(f'{source}: a bare weights file; import it with --model_kwargs first (ctm-import)')
  return _read_kwargs_file(path)


def _read_kwargs_file(path: str) -> dict:
  if not os.path.isfile(path):  # a FIFO or a device would block the read
    raise ValueError(f'{path}: not a regular file; expected a JSON object of constructor kwargs')
  try:
    with open(path) as f:
      kwargs = json.loads(f.read(1 << 20))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a JSON object of constructor kwargs ({e})') from None
  if not isinstance(kwargs, dict):
    raise ValueError(f'{path}: not a JSON object of constructor kwargs')
  return kwargs


def _optional(source: str) -> str | None:
  """config.json of a Hub repo when --model_kwargs may stand in for it."""
  try:
    return download(source, CONFIG_FILE)
  except ValueError:
    return None


def write_model(out: str, kwargs: dict, state_dict: dict[str, np.ndarray], card: str,
                overwrite: bool = False) -> dict:
  """`out` as the reference's Hub mixin writes a model: config.json (the
  constructor's kwargs), model.safetensors (the state_dict; first-last's
  `_right` index buffers, the same tensors as their `_left` twins in the
  reference, stored once under the metadata's map) and a model card
  README.md. Written to a sibling folder of its own first, then moved into
  place whole; a Hub model there is replaced with `overwrite`, nothing else
  ever (ctm_jax/outputs.py).
  Returns {file: bytes}."""
  save_file = extras.module('safetensors.numpy', '--format=hf').save_file
  # asarray, not ascontiguousarray: that makes a scalar (num_batches_tracked) 1-d.
  tensors = {name: np.asarray(value, order='C') for name, value in state_dict.items()}
  metadata = {'format': 'pt'}
  if kwargs.get('neuron_select_type') == 'first-last':
    for name in sorted(tensors):
      twin = name[: -len('_right')] + '_left' if name.endswith('_right') else None
      if twin in tensors and np.array_equal(tensors[twin], tensors[name]):
        metadata[name] = twin
        del tensors[name]
  with outputs.building(out, 'hub_model', overwrite) as tmp:
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata=metadata)
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(kwargs, f, indent=1)
    with open(os.path.join(tmp, CARD_FILE), 'w') as f:
      f.write(card)
  return {name: os.path.getsize(os.path.join(out, name)) for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)}


def push(folder: str, repo_id: str) -> str:
  """Uploads `folder` to the Hub model repo `repo_id` (made if absent) with
  huggingface_hub and its login; returns the repo's URL. One-line ValueError
  naming the repo and the fix."""
  if len(repo_id.split('/')) != 2 or not all(repo_id.split('/')):
    raise ValueError(f'--push_to_hub={repo_id}: expected ORG/NAME')
  hub = extras.module('huggingface_hub', f'--push_to_hub={repo_id}')
  errors = extras.module('huggingface_hub.errors', f'--push_to_hub={repo_id}')
  api = hub.HfApi()
  try:
    api.create_repo(repo_id, repo_type='model', exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type='model',
                      commit_message='Upload a CTM exported by ctm-jax')
  except errors.LocalTokenNotFoundError:
    raise ValueError(f'--push_to_hub={repo_id}: not logged in to the Hub; run hf auth login or set HF_TOKEN') from None
  except (errors.HfHubHTTPError, OSError) as e:
    raise ValueError(f'--push_to_hub={repo_id}: the upload failed ({_first_line(e)}); {folder} holds the files') from None
  return f'https://huggingface.co/{repo_id}'

