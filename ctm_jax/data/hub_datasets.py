"""Datasets on the Hugging Face Hub (hf://ORG/NAME[@REVISION]): their
parquet files through huggingface_hub's cache, the Hub's Image feature
decoded to float32 pictures. The hub extra (huggingface_hub, pyarrow)."""

import io
import os

import numpy as np

from ctm_jax import extras
from ctm_jax.interop import hub


def split_files(source: str, split: str) -> list[str]:
  """The local paths of the parquet files of `split` (the Hub's layout:
  data/<split>-*.parquet or <split>/*.parquet), from the cache or downloaded
  into it; one-line ValueError naming the repo, the split and the fix."""
  root = _snapshot(source)
  found = sorted(
      os.path.join(folder, name)
      for folder, _, names in os.walk(root)
      for name in names
      if name.endswith('.parquet') and (name.startswith(f'{split}-') or os.path.basename(folder) == split)
  )
  if not found:
    raise ValueError(f'{source}: no {split} split (data/{split}-*.parquet) in the dataset')
  return found


def _snapshot(source: str) -> str:
  """The local folder of a dataset repo's parquet files (from the cache when
  there: one metadata request online, none offline)."""
  repo_id, _ = hub.parse(source)
  return hub.fetch(
      source, 'its parquet files',
      lambda hf, repo, revision: hf.snapshot_download(
          repo, repo_type='dataset', revision=revision, allow_patterns=['*.parquet', '**/*.parquet']),
      fix_offline=f'hf download --repo-type=dataset {repo_id}',
  )


def parquet_images(paths: list[str], limit: int | None = None) -> list[np.ndarray]:
  """The `image` column of parquet files (the Hub's Image feature: PNG bytes)
  as float32 (H, W, 3) pictures in [0, 1], in file and row order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  parquet = extras.module('pyarrow.parquet', paths[0] if paths else 'a Hub dataset')
  images = []
  for path in paths:
    for cell in _image_cells(parquet, path, limit or 1024):
      data = cell.get('bytes') if isinstance(cell, dict) else cell
      if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f'{path}: an image cell holds no PNG bytes')
      with Image.open(io.BytesIO(data)) as image:
        images.append(np.asarray(image.convert('RGB'), np.float32) / 255)
      if limit is not None and len(images) >= limit:
        return images
  return images


def _image_cells(parquet, path: str, batch_size: int):
  """The `image` cells of a parquet file, a batch at a time: a `limit` (the
  size check before training) reads only the first batch."""
  try:
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=batch_size, columns=['image']):
      yield from batch.column('image').to_pylist()
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f'{path}: not a parquet file with an image column ({e})') from None
