"""Host-side image augmentation for the image-classification input pipeline.

NumPy + Pillow only: these run inside grain data workers/threads, never on the
accelerator. Every random function takes a `np.random.Generator` (grain's
`MapDataset.random_map` hands one per record), so a fixed seed reproduces the
output exactly. Semantics follow torchvision's PIL code paths, which the PyTorch
reference trains with: `AutoAugment(AutoAugmentPolicy.CIFAR10)`,
`RandomResizedCrop`, `RandomHorizontalFlip`, `Resize(int)`, `CenterCrop` and
`Normalize`. Pillow does every pixel operation.

Dimension glossary: H height, W width, C channels (1 or 3).
"""

import math
import numbers

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Per-dataset channel statistics the reference normalizes with.
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.5070751592371341, 0.48654887331495067, 0.4409178433670344)
CIFAR100_STD = (0.2673342858792403, 0.2564384629170882, 0.27615047132568393)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# AutoAugment's magnitude discretisation.
MAGNITUDE_BINS = 10

# The AutoAugment CIFAR10 policy (Cubuk et al. 2019, appendix table), in torchvision's order:
# 25 sub-policies of two (op_name, probability, magnitude_bin) ops; bin None = no magnitude.
CIFAR10_POLICY = (
    (('Invert', 0.1, None), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, None), ('Equalize', 0.5, None)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, None)),
    (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.2, None), ('Equalize', 0.6, None)),
    (('Color', 0.9, 9), ('Equalize', 0.6, None)),
    (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, None), ('Invert', 0.1, None)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
)

# Ops whose magnitude is negated with probability 0.5.
SIGNED_OPS = frozenset(
    (
        'ShearX',
        'ShearY',
        'TranslateX',
        'TranslateY',
        'Rotate',
        'Brightness',
        'Color',
        'Contrast',
        'Sharpness',
    )
)
# Ops that ignore the magnitude.
UNARY_OPS = frozenset(('AutoContrast', 'Equalize', 'Invert'))
OPS = SIGNED_OPS | UNARY_OPS | {'Posterize', 'Solarize'}

_ENHANCERS = {
    'Brightness': ImageEnhance.Brightness,
    'Color': ImageEnhance.Color,
    'Contrast': ImageEnhance.Contrast,
    'Sharpness': ImageEnhance.Sharpness,
}


# --- validation and PIL conversion ---------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_image(name: str, image) -> None:
  if not isinstance(image, np.ndarray):
    raise ValueError(f'{name} must be a numpy array, got {type(image).__name__}')
  if image.dtype != np.uint8:
    raise ValueError(f'{name} must be uint8, got dtype {image.dtype}')
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or 0 in image.shape:
    raise ValueError(
        f'{name} must be a non-empty (H, W, C) image with C in (1, 3), got shape ' f'{image.shape}'
    )


def _check_rng(rng) -> None:
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f'rng must be a numpy.random.Generator, got {type(rng).__name__}')


def _check_size(name: str, size) -> None:
  if not _is_int(size) or size <= 0:
    raise ValueError(f'{name} must be a positive int, got {size!r}')


def _check_range(name: str, bounds, upper=None) -> tuple:
  """(lo, hi) floats with 0 < lo <= hi (<= upper); ValueError naming `name` otherwise."""
  try:
    lo, hi = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a (low, high) pair of numbers, got {bounds!r}') from None
  if not (0 < lo <= hi) or (upper is not None and hi > upper):
    limit = f' <= {upper}' if upper is not None else ''
    raise ValueError(f'{name} must satisfy 0 < low <= high{limit}, got {bounds!r}')
  return lo, hi


def _to_pil(image_HxWxC: np.ndarray) -> Image.Image:
  # A 2-D uint8 array becomes mode 'L', an (H, W, 3) one mode 'RGB'.
  if image_HxWxC.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(image_HxWxC[..., 0]))
  return Image.fromarray(np.ascontiguousarray(image_HxWxC))


def _from_pil(pil: Image.Image) -> np.ndarray:
  array = np.asarray(pil, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _fill(pil: Image.Image):
  return 0 if pil.mode == 'L' else (0,) * len(pil.getbands())


# --- AutoAugment ---------------------------------------------------------------------------------


def op_magnitude(op_name: str, magnitude_bin, height: int, width: int) -> float:
  """Unsigned magnitude of `op_name` at `magnitude_bin` for an (height, width) image.

  The torchvision tables: shear linspace(0, 0.3), translate linspace(0, 150/331 * extent) pixels,
  rotate linspace(0, 30) degrees, enhance linspace(0, 0.9), posterize 8 - round(bin / 2.25)
  bits, solarize threshold linspace(255, 0). Magnitude-free ops give 0.0.
  """
  if op_name not in OPS:
    raise ValueError(f'op_name must be one of {sorted(OPS)}, got {op_name!r}')
  if op_name in UNARY_OPS:
    return 0.0
  if not _is_int(magnitude_bin) or not 0 <= magnitude_bin < MAGNITUDE_BINS:
    raise ValueError(
        f'magnitude_bin must be an int in [0, {MAGNITUDE_BINS}), got {magnitude_bin!r}'
    )
  if op_name in ('ShearX', 'ShearY'):
    table = np.linspace(0.0, 0.3, MAGNITUDE_BINS)
  elif op_name == 'TranslateX':
    table = np.linspace(0.0, 150.0 / 331.0 * width, MAGNITUDE_BINS)
  elif op_name == 'TranslateY':
    table = np.linspace(0.0, 150.0 / 331.0 * height, MAGNITUDE_BINS)
  elif op_name == 'Rotate':
    table = np.linspace(0.0, 30.0, MAGNITUDE_BINS)
  elif op_name in _ENHANCERS:
    table = np.linspace(0.0, 0.9, MAGNITUDE_BINS)
  elif op_name == 'Posterize':
    table = 8 - np.round(np.arange(MAGNITUDE_BINS) / ((MAGNITUDE_BINS - 1) / 4)).astype(int)
  else:  # Solarize
    table = np.linspace(255.0, 0.0, MAGNITUDE_BINS)
  return float(table[magnitude_bin])


def _apply_op_pil(pil: Image.Image, op_name: str, magnitude: float) -> Image.Image:
  nearest = Image.Resampling.NEAREST
  if op_name in ('ShearX', 'ShearY'):
    # Shear about the top-left corner by angle atan(magnitude): the inverse map is
    # x_in = x + m * y (ShearX) or y_in = y + m * x (ShearY), sampled at pixel centres.
    coeffs = (1, magnitude, 0, 0, 1, 0) if op_name == 'ShearX' else (1, 0, 0, magnitude, 1, 0)
    return pil.transform(pil.size, Image.Transform.AFFINE, coeffs, nearest, fillcolor=_fill(pil))
  if op_name in ('TranslateX', 'TranslateY'):
    # Whole pixels (torchvision truncates); positive moves content right / down.
    shift = int(magnitude)
    coeffs = (1, 0, -shift, 0, 1, 0) if op_name == 'TranslateX' else (1, 0, 0, 0, 1, -shift)
    return pil.transform(pil.size, Image.Transform.AFFINE, coeffs, nearest, fillcolor=_fill(pil))
  if op_name == 'Rotate':
    # Counter-clockwise degrees about the centre, same canvas.
    return pil.rotate(magnitude, resample=nearest, fillcolor=_fill(pil))
  if op_name in _ENHANCERS:
    return _ENHANCERS[op_name](pil).enhance(1.0 + magnitude)
  if op_name == 'Posterize':
    return ImageOps.posterize(pil, int(magnitude))
  if op_name == 'Solarize':
    return ImageOps.solarize(pil, magnitude)
  if op_name == 'AutoContrast':
    return ImageOps.autocontrast(pil)
  if op_name == 'Equalize':
    return ImageOps.equalize(pil)
  return ImageOps.invert(pil)  # Invert


def apply_op(image_HxWxC: np.ndarray, op_name: str, magnitude: float = 0.0) -> np.ndarray:
  """One AutoAugment op at an explicit (signed) magnitude; uint8 (H, W, C) in and out.

  `magnitude` is in the op's own units: shear factor, translate pixels, rotate degrees, enhance
  offset (factor 1 + magnitude), posterize bits, solarize threshold; ignored by AutoContrast,
  Equalize and Invert.
  """
  _check_image('image_HxWxC', image_HxWxC)
  if op_name not in OPS:
    raise ValueError(f'op_name must be one of {sorted(OPS)}, got {op_name!r}')
  if op_name == 'Posterize' and not 0 <= int(magnitude) <= 8:
    raise ValueError(f'magnitude for Posterize must be 0..8 bits, got {magnitude!r}')
  return _from_pil(_apply_op_pil(_to_pil(image_HxWxC), op_name, float(magnitude)))


def sample_auto_augment_params(rng: np.random.Generator, num_policies: int = len(CIFAR10_POLICY)):
  """(policy_index, apply_draws[2], sign_draws[2]) in the order `auto_augment_cifar10` uses.

  Op i applies when apply_draws[i] < its probability; a signed op's magnitude is negated when
  sign_draws[i] == 0.
  """
  _check_rng(rng)
  policy_index = int(rng.integers(num_policies))
  apply_draws = rng.random(2)
  sign_draws = rng.integers(2, size=2)
  return policy_index, apply_draws, sign_draws


def auto_augment_cifar10(image_HxWxC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """AutoAugment with the CIFAR10 policy; uint8 (H, W, C) in, same shape and dtype out."""
  _check_image('image_HxWxC', image_HxWxC)
  policy_index, apply_draws, sign_draws = sample_auto_augment_params(rng)
  height, width = image_HxWxC.shape[:2]
  pil = None
  for (op_name, prob, magnitude_bin), draw, sign in zip(
      CIFAR10_POLICY[policy_index], apply_draws, sign_draws
  ):
    if draw >= prob:
      continue
    magnitude = op_magnitude(op_name, magnitude_bin, height, width)
    if op_name in SIGNED_OPS and sign == 0:
      magnitude = -magnitude
    pil = _apply_op_pil(pil if pil is not None else _to_pil(image_HxWxC), op_name, magnitude)
  # Untouched images skip the PIL round trip but still come back as a fresh array.
  return image_HxWxC.copy() if pil is None else _from_pil(pil)


# --- crops, flips, resizes, normalization --------------------------------------------------------


def sample_crop_box(
    height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple:
  """(top, left, h, w) of a RandomResizedCrop box, torchvision's sampler.

  Up to 10 tries of area fraction ~ U(scale) and aspect w/h ~ logU(ratio); the first box that
  fits wins. Otherwise a centre crop of the whole image with its aspect clamped into `ratio`.
  """
  _check_size('height', height)
  _check_size('width', width)
  _check_rng(rng)
  scale_lo, scale_hi = _check_range('scale', scale, upper=1.0)
  ratio_lo, ratio_hi = _check_range('ratio', ratio)
  area = height * width
  log_ratio_lo, log_ratio_hi = math.log(ratio_lo), math.log(ratio_hi)
  for _ in range(10):
    target_area = area * rng.uniform(scale_lo, scale_hi)
    aspect = math.exp(rng.uniform(log_ratio_lo, log_ratio_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio_lo:
    w, h = width, int(round(width / ratio_lo))
  elif in_ratio > ratio_hi:
    w, h = int(round(height * ratio_hi)), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image_HxWxC: np.ndarray,
    rng: np.random.Generator,
    size: int = 224,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
) -> np.ndarray:
  """torchvision RandomResizedCrop: a `sample_crop_box` crop resized BILINEAR to (size, size, C)."""
  _check_image('image_HxWxC', image_HxWxC)
  _check_size('size', size)
  height, width = image_HxWxC.shape[:2]
  top, left, h, w = sample_crop_box(height, width, rng, scale, ratio)
  pil = _to_pil(image_HxWxC).crop((left, top, left + w, top + h))
  return _from_pil(pil.resize((size, size), Image.Resampling.BILINEAR))


def horizontal_flip(
    image_HxWxC: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> np.ndarray:
  """Mirrors left-right with probability `p` (one uniform draw per call)."""
  _check_image('image_HxWxC', image_HxWxC)
  _check_rng(rng)
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
    raise ValueError(f'p must be a probability in [0, 1], got {p!r}')
  if rng.random() < p:
    return np.ascontiguousarray(image_HxWxC[:, ::-1])
  return image_HxWxC.copy()


def resize_shorter(image_HxWxC: np.ndarray, size: int = 256) -> np.ndarray:
  """Shorter side to `size`, aspect kept (longer side int(size * long / short)), BILINEAR."""
  _check_image('image_HxWxC', image_HxWxC)
  _check_size('size', size)
  height, width = image_HxWxC.shape[:2]
  if width <= height:
    new_h, new_w = int(size * height / width), size
  else:
    new_h, new_w = size, int(size * width / height)
  if (new_h, new_w) == (height, width):
    return image_HxWxC.copy()
  return _from_pil(_to_pil(image_HxWxC).resize((new_w, new_h), Image.Resampling.BILINEAR))


def center_crop(image_HxWxC: np.ndarray, size: int = 224) -> np.ndarray:
  """Central (size, size) window, top = int(round((H - size) / 2)); zero-pads a smaller image."""
  _check_image('image_HxWxC', image_HxWxC)
  _check_size('size', size)
  height, width = image_HxWxC.shape[:2]
  if size > height or size > width:
    # torchvision pads (floor before, ceil after) with zeros, then crops.
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    image_HxWxC = np.pad(
        image_HxWxC, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    height, width = image_HxWxC.shape[:2]
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return np.ascontiguousarray(image_HxWxC[top : top + size, left : left + size])


def normalize(image_uint8: np.ndarray, mean, std) -> np.ndarray:
  """float32 (x / 255 - mean) / std per channel; mean and std have one entry per channel."""
  _check_image('image_uint8', image_uint8)
  channels = image_uint8.shape[-1]
  mean_C = np.asarray(mean, dtype=np.float32).reshape(-1)
  std_C = np.asarray(std, dtype=np.float32).reshape(-1)
  if mean_C.shape != (channels,):
    raise ValueError(f'mean must have {channels} entries (one per channel), got {mean!r}')
  if std_C.shape != (channels,) or not np.all(std_C > 0):
    raise ValueError(f'std must have {channels} positive entries (one per channel), got {std!r}')
  return (image_uint8.astype(np.float32) / np.float32(255.0) - mean_C) / std_C
