"""Tests for ctm_jax/data/augment.py: host-side AutoAugment, crops, flips, normalization.

Dimension glossary: N images, H height, W width, C channels.
"""

import math

import numpy as np
import pytest

from ctm_jax.data import augment

OP_NAMES = {
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Rotate',
    'Brightness',
    'Color',
    'Contrast',
    'Sharpness',
    'Posterize',
    'Solarize',
    'AutoContrast',
    'Equalize',
    'Invert',
}


def _image(seed, shape=(32, 32, 3), low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def _smooth_batch_NxHxWxC(n, shape=(32, 32, 3), seed=0):
  """Natural-ish images: a mid-range gradient plus noise, so every op has something to change."""
  rng = np.random.default_rng(seed)
  height, width, channels = shape
  yy, xx = np.mgrid[:height, :width]
  batch = []
  for _ in range(n):
    base_HxWxC = (
        60
        + 60 * (yy / height)[..., None] * rng.uniform(0.5, 1.5, channels)
        + 40 * (xx / width)[..., None] * rng.uniform(0.5, 1.5, channels)
    )
    noise_HxWxC = rng.normal(0, 12, shape)
    batch.append(np.clip(base_HxWxC + noise_HxWxC, 0, 255).astype(np.uint8))
  return np.stack(batch)


# --- policy table --------------------------------------------------------------------------------


def test_cifar10_policy_table():
  assert len(augment.CIFAR10_POLICY) == 25
  for sub_policy in augment.CIFAR10_POLICY:
    assert len(sub_policy) == 2
    for op_name, prob, magnitude_bin in sub_policy:
      assert op_name in OP_NAMES
      assert 0.0 <= prob <= 1.0
      if op_name in ('AutoContrast', 'Equalize', 'Invert'):
        assert magnitude_bin is None
      else:
        assert isinstance(magnitude_bin, int) and 0 <= magnitude_bin < 10
  # Spot checks against the paper's table.
  assert augment.CIFAR10_POLICY[0] == (('Invert', 0.1, None), ('Contrast', 0.2, 6))
  assert augment.CIFAR10_POLICY[3] == (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9))
  assert augment.CIFAR10_POLICY[22] == (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3))
  assert augment.CIFAR10_POLICY[24] == (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None))
  used = {op for sub_policy in augment.CIFAR10_POLICY for op, _, _ in sub_policy}
  assert used == OP_NAMES - {'ShearX'}  # the CIFAR10 policy never shears along x


def test_magnitude_tables():
  assert augment.op_magnitude('ShearX', 9, 32, 32) == pytest.approx(0.3)
  assert augment.op_magnitude('Rotate', 2, 32, 32) == pytest.approx(30 * 2 / 9)
  assert augment.op_magnitude('TranslateX', 9, 10, 331) == pytest.approx(150)
  assert augment.op_magnitude('TranslateY', 9, 331, 10) == pytest.approx(150)
  assert augment.op_magnitude('Contrast', 9, 32, 32) == pytest.approx(0.9)
  bits = [augment.op_magnitude('Posterize', b, 32, 32) for b in range(10)]
  assert bits == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
  assert augment.op_magnitude('Solarize', 0, 32, 32) == 255
  assert augment.op_magnitude('Solarize', 9, 32, 32) == 0
  assert augment.op_magnitude('Invert', None, 32, 32) == 0.0
  with pytest.raises(ValueError, match='magnitude_bin'):
    augment.op_magnitude('Rotate', 10, 32, 32)
  with pytest.raises(ValueError, match='op_name'):
    augment.op_magnitude('Blur', 1, 32, 32)


# --- single ops against independent expectations -----------------------------------------------


@pytest.mark.parametrize('channels', [3, 1])
def test_invert_solarize_posterize(channels):
  image = _image(1, (16, 20, channels))
  np.testing.assert_array_equal(augment.apply_op(image, 'Invert'), 255 - image)
  for threshold in (128, 226.67, 0.0):
    expected = np.where(image >= threshold, 255 - image, image)
    np.testing.assert_array_equal(augment.apply_op(image, 'Solarize', threshold), expected)
  for bits in (4, 6, 8):
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    np.testing.assert_array_equal(augment.apply_op(image, 'Posterize', bits), image & mask)


@pytest.mark.parametrize('channels', [3, 1])
def test_translate_shifts_with_zero_fill(channels):
  image = _image(2, (16, 20, channels), low=1)  # no zeros, so the fill is visible
  k = 5
  out = augment.apply_op(image, 'TranslateX', k)
  np.testing.assert_array_equal(out[:, k:], image[:, :-k])
  assert not out[:, :k].any()
  out = augment.apply_op(image, 'TranslateX', -k)
  np.testing.assert_array_equal(out[:, :-k], image[:, k:])
  assert not out[:, -k:].any()
  out = augment.apply_op(image, 'TranslateY', k + 0.9)  # whole pixels: truncated to k
  np.testing.assert_array_equal(out[k:], image[:-k])
  assert not out[:k].any()


@pytest.mark.parametrize('magnitude', [0.3, -0.3, 0.1])
def test_shear_about_top_left(magnitude):
  image = _image(3, (20, 24, 3), low=1)
  height, width, _ = image.shape
  # Nearest sampling at pixel centres of the inverse map x_in = x + m * y (resp. y_in = y + m * x).
  expected_x = np.zeros_like(image)
  expected_y = np.zeros_like(image)
  for y in range(height):
    for x in range(width):
      x_in = math.floor(x + 0.5 + magnitude * (y + 0.5))
      if 0 <= x_in < width:
        expected_x[y, x] = image[y, x_in]
      y_in = math.floor(y + 0.5 + magnitude * (x + 0.5))
      if 0 <= y_in < height:
        expected_y[y, x] = image[y_in, x]
  out_x = augment.apply_op(image, 'ShearX', magnitude)
  np.testing.assert_array_equal(out_x, expected_x)
  np.testing.assert_array_equal(augment.apply_op(image, 'ShearY', magnitude), expected_y)
  # The corner rows: the top row barely moves, the bottom row by ~m * H with zero fill.
  np.testing.assert_array_equal(out_x[0], image[0])
  shift = math.floor(abs(magnitude) * (height - 0.5) + 0.5)
  if magnitude > 0:
    assert not out_x[-1, width - shift :].any()
  else:
    assert not out_x[-1, :shift].any()


def test_rotate():
  image = _image(4, (17, 23, 3))
  np.testing.assert_array_equal(augment.apply_op(image, 'Rotate', 0.0), image)
  np.testing.assert_array_equal(augment.apply_op(image, 'Rotate', 1e-4), image)
  square = _image(5, (16, 16, 3))
  # Positive degrees turn counter-clockwise, like np.rot90.
  np.testing.assert_array_equal(augment.apply_op(square, 'Rotate', 90.0), np.rot90(square))
  # A 30 degree turn leaves the corners empty (fill 0) and keeps the centre pixel.
  out = augment.apply_op(_image(6, (31, 31, 3), low=1), 'Rotate', 30.0)
  assert not out[0, 0].any() and not out[-1, -1].any()
  assert out[15, 15].all()


def test_enhance_ops():
  image = _smooth_batch_NxHxWxC(1)[0]
  for op_name in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
    np.testing.assert_array_equal(augment.apply_op(image, op_name, 0.0), image)
  # Factor 1 + m: brightness scales pixels, factor 0 gives black.
  brighter = augment.apply_op(image, 'Brightness', 0.5).astype(int)
  np.testing.assert_allclose(brighter, np.minimum(image * 1.5, 255), atol=1)
  assert not augment.apply_op(image, 'Brightness', -1.0).any()
  gray = augment.apply_op(image, 'Color', -1.0)
  assert (gray == gray[..., :1]).all()  # zero saturation: all channels equal
  flat = augment.apply_op(image, 'Contrast', -1.0)
  assert np.ptp(flat) == 0  # zero contrast: one uniform grey
  lower = augment.apply_op(image, 'Contrast', -0.5).astype(int)
  assert np.ptp(lower) < np.ptp(image.astype(int))
  assert not np.array_equal(augment.apply_op(image, 'Sharpness', 0.9), image)


@pytest.mark.parametrize('channels', [3, 1])
def test_autocontrast_and_equalize(channels):
  # Enough pixels that Pillow's equalize step (pixels // 255) is non-zero.
  image = _image(7, (64, 64, channels), low=80, high=160)
  stretched = augment.apply_op(image, 'AutoContrast')
  for c in range(channels):
    # A linear stretch of [min, max] onto [0, 255] (Pillow's integer table may land 1 below).
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    linear = (image[..., c].astype(float) - lo) * 255.0 / (hi - lo)
    np.testing.assert_allclose(stretched[..., c], linear, atol=1.0)
    assert stretched[..., c].min() == 0 and stretched[..., c].max() >= 254
  equalized = augment.apply_op(image, 'Equalize')
  for c in range(channels):
    # A monotone per-channel remapping that spreads the narrow histogram out.
    order = np.argsort(image[..., c], axis=None, kind='stable')
    assert np.all(np.diff(equalized[..., c].reshape(-1)[order].astype(int)) >= 0)
    assert np.ptp(equalized[..., c]) > np.ptp(image[..., c])


def test_apply_op_rejects_bad_arguments():
  with pytest.raises(ValueError, match='op_name'):
    augment.apply_op(_image(0), 'Blur', 1.0)
  with pytest.raises(ValueError, match='dtype float32'):
    augment.apply_op(_image(0).astype(np.float32), 'Invert')
  with pytest.raises(ValueError, match=r'shape \(4, 4\)'):
    augment.apply_op(np.zeros((4, 4), np.uint8), 'Invert')


# --- the full policy ----------------------------------------------------------------------------


@pytest.mark.parametrize('channels', [3, 1])
def test_auto_augment_deterministic_and_changes_images(channels):
  batch_NxHxWxC = _smooth_batch_NxHxWxC(200, (32, 32, channels))
  outs = []
  for i, image in enumerate(batch_NxHxWxC):
    out = augment.auto_augment_cifar10(image, np.random.default_rng(i))
    assert out.shape == image.shape and out.dtype == np.uint8
    again = augment.auto_augment_cifar10(image, np.random.default_rng(i))
    np.testing.assert_array_equal(out, again)
    outs.append(out)
  changed = np.mean([not np.array_equal(o, x) for o, x in zip(outs, batch_NxHxWxC)])
  # About 3/4 of draws apply at least one op; some ops (e.g. Color bin 0) are near-identity.
  assert changed > 0.5, changed
  # Different seeds: the same image comes out in several different ways.
  image = batch_NxHxWxC[0]
  variants = {
      augment.auto_augment_cifar10(image, np.random.default_rng(seed)).tobytes()
      for seed in range(30)
  }
  assert len(variants) >= 5


def test_auto_augment_composes_the_sampled_ops():
  """The output equals the sampled sub-policy's ops applied in order via apply_op."""
  image = _smooth_batch_NxHxWxC(1, (24, 28, 3), seed=3)[0]
  height, width, _ = image.shape
  for seed in range(60):
    policy_index, draws, signs = augment.sample_auto_augment_params(np.random.default_rng(seed))
    expected = image
    for (op_name, prob, magnitude_bin), draw, sign in zip(
        augment.CIFAR10_POLICY[policy_index], draws, signs
    ):
      if draw < prob:
        magnitude = augment.op_magnitude(op_name, magnitude_bin, height, width)
        if op_name in augment.SIGNED_OPS and sign == 0:
          magnitude = -magnitude
        expected = augment.apply_op(expected, op_name, magnitude)
    out = augment.auto_augment_cifar10(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, expected)


def test_sub_policy_choice_is_uniform_and_ops_fire_at_their_probability():
  rng = np.random.default_rng(1234)
  n = 25_000
  counts = np.zeros(25)
  fired = np.zeros((25, 2))
  negated = 0
  for _ in range(n):
    policy_index, draws, signs = augment.sample_auto_augment_params(rng)
    counts[policy_index] += 1
    probs = [prob for _, prob, _ in augment.CIFAR10_POLICY[policy_index]]
    fired[policy_index] += draws < probs
    negated += int(signs[0] == 0)
  expected = n / 25
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 70, chi2  # 24 dof: mean 24, p(chi2 > 70) ~ 2e-6
  probs_Px2 = np.array([[prob for _, prob, _ in sp] for sp in augment.CIFAR10_POLICY])
  np.testing.assert_allclose(fired / counts[:, None], probs_Px2, atol=0.07)
  assert fired[14, 1] == 0  # ('Invert', 0.0) never fires
  assert abs(negated / n - 0.5) < 0.02


def test_auto_augment_rejects_bad_arguments():
  with pytest.raises(ValueError, match='rng'):
    augment.auto_augment_cifar10(_image(0), 0)
  with pytest.raises(ValueError, match='uint8'):
    augment.auto_augment_cifar10(_image(0).astype(np.int32), np.random.default_rng(0))
  with pytest.raises(ValueError, match=r'\(16, 16, 4\)'):
    augment.auto_augment_cifar10(_image(0, (16, 16, 4)), np.random.default_rng(0))


# --- crops, flips, resizes, normalization --------------------------------------------------------


@pytest.mark.parametrize('shape', [(300, 400, 3), (400, 300, 1), (64, 64, 3)])
def test_random_resized_crop(shape):
  image = _image(8, shape)
  out = augment.random_resized_crop(image, np.random.default_rng(0), size=56)
  assert out.shape == (56, 56, shape[-1]) and out.dtype == np.uint8
  np.testing.assert_array_equal(
      out, augment.random_resized_crop(image, np.random.default_rng(0), size=56)
  )
  outs = {
      augment.random_resized_crop(image, np.random.default_rng(s), size=56).tobytes()
      for s in range(10)
  }
  assert len(outs) > 5


@pytest.mark.parametrize('scale', [(0.08, 1.0), (0.3, 0.5), (0.9, 1.0)])
def test_sample_crop_box_area_within_scale(scale):
  height, width = 240, 320
  rng = np.random.default_rng(5)
  fractions, aspects = [], []
  for _ in range(500):
    top, left, h, w = augment.sample_crop_box(height, width, rng, scale=scale)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    fractions.append(h * w / (height * width))
    aspects.append(w / h)
  fractions, aspects = np.array(fractions), np.array(aspects)
  # Rounding w and h to whole pixels moves the area by at most ~(h + w) / 2 pixels.
  slack = (height + width) / (height * width)
  assert fractions.min() >= scale[0] - slack and fractions.max() <= scale[1] + slack
  assert np.all((aspects > 3 / 4 - 0.05) & (aspects < 4 / 3 + 0.05))
  # The draws cover the range rather than sticking to one box.
  assert np.ptp(fractions) > 0.5 * (scale[1] - scale[0])


def test_sample_crop_box_fallback_is_clamped_centre_crop():
  # A 10x100 strip never fits a box of aspect <= 4/3 and area >= 0.5: fall back to the centre.
  rng = np.random.default_rng(0)
  assert augment.sample_crop_box(10, 100, rng, scale=(0.9, 1.0)) == (0, 43, 10, 13)
  assert augment.sample_crop_box(100, 10, rng, scale=(0.9, 1.0)) == (43, 0, 13, 10)
  with pytest.raises(ValueError, match='scale'):
    augment.sample_crop_box(10, 10, rng, scale=(0.5, 0.1))
  with pytest.raises(ValueError, match='ratio'):
    augment.sample_crop_box(10, 10, rng, ratio=(0.0, 1.0))
  with pytest.raises(ValueError, match='height'):
    augment.sample_crop_box(0, 10, rng)


def test_horizontal_flip():
  image = _image(9, (8, 10, 3))
  np.testing.assert_array_equal(
      augment.horizontal_flip(image, np.random.default_rng(0), p=1.0), image[:, ::-1]
  )
  np.testing.assert_array_equal(
      augment.horizontal_flip(image, np.random.default_rng(0), p=0.0), image
  )
  flips = [
      np.array_equal(augment.horizontal_flip(image, np.random.default_rng(s)), image[:, ::-1])
      for s in range(400)
  ]
  assert 0.4 < np.mean(flips) < 0.6
  with pytest.raises(ValueError, match='p must'):
    augment.horizontal_flip(image, np.random.default_rng(0), p=1.5)


@pytest.mark.parametrize(
    'shape, resized',
    [
        ((300, 400, 3), (256, 341, 3)),
        ((500, 333, 3), (384, 256, 3)),
        ((256, 256, 1), (256, 256, 1)),
    ],
)
def test_resize_shorter_then_center_crop(shape, resized):
  height, width, _ = shape
  image = np.zeros(shape, np.uint8)
  # A bright block at the centre survives the resize and stays in the centre crop's middle.
  image[height // 2 - 20 : height // 2 + 20, width // 2 - 20 : width // 2 + 20] = 255
  out = augment.resize_shorter(image, 256)
  assert out.shape == resized and out.dtype == np.uint8
  crop = augment.center_crop(out, 224)
  assert crop.shape == (224, 224, shape[-1])
  assert crop[112, 112].min() == 255
  assert crop[0, 0].max() == 0 and crop[-1, -1].max() == 0


def test_center_crop_offsets():
  image = np.arange(7 * 9, dtype=np.uint8).reshape(7, 9, 1)
  crop = augment.center_crop(image, 4)
  top, left = int(round((7 - 4) / 2.0)), int(round((9 - 4) / 2.0))
  np.testing.assert_array_equal(crop, image[top : top + 4, left : left + 4])
  padded = augment.center_crop(image, 11)  # larger than the image: zero padding around it
  assert padded.shape == (11, 11, 1)
  np.testing.assert_array_equal(padded[2:9, 1:10], image)
  assert padded.sum() == image.sum()
  with pytest.raises(ValueError, match='size'):
    augment.center_crop(image, 0)


def test_normalize():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = augment.normalize(image, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  np.testing.assert_allclose(out[0, 0], [-1.0, 2.0, 0.0], atol=1e-6)
  batch = _image(10, (8, 8, 3))
  out = augment.normalize(batch, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
  expected = (batch / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  gray = augment.normalize(np.full((2, 2, 1), 255, np.uint8), (0.5,), (0.5,))
  np.testing.assert_allclose(gray, 1.0)
  with pytest.raises(ValueError, match='mean'):
    augment.normalize(batch, (0.5,), (0.5, 0.5, 0.5))
  with pytest.raises(ValueError, match='std'):
    augment.normalize(batch, (0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def test_dataset_statistics():
  for mean, std in (
      (augment.CIFAR10_MEAN, augment.CIFAR10_STD),
      (augment.CIFAR100_MEAN, augment.CIFAR100_STD),
      (augment.IMAGENET_MEAN, augment.IMAGENET_STD),
  ):
    assert len(mean) == 3 and len(std) == 3
    assert all(0.4 < m < 0.52 for m in mean) and all(0.2 < s < 0.3 for s in std)
  assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert augment.CIFAR10_STD[0] == 0.24703233
