"""Tests for ctm_jax.models.backbones and ctm_jax.models.posemb.

Golden checks import the reference's state_dict from ../shared/golden and compare
the backbone and positional-embedding outputs with the reference's forward hooks.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, load_golden
from ctm_jax.interop import torch as torch_interop
from ctm_jax.models import backbones, posemb

# Golden cases with a backbone and a positional embedding (their json names
# them); the compact ones ship in tests/golden, the others in ../shared/golden
# (maze_compact has neither: its maze is read as raw pixels).
GOLDEN_CASES = ["image_rp", "image_compact", "firstlast_unet8", "parity"]


def torch_to_flax(state_dict, prefix: str, module, *init_args, **init_kwargs) -> dict:
  """The importer's conversion of the entries under `prefix` onto `module`'s variables."""
  sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
  return torch_interop.convert_state_dict(sub, abstract)


def _nchw_to_nhwc(a):
  return np.moveaxis(a, 1, -1)


@pytest.mark.parametrize("perturbed", [False, True], ids=["plain", "perturbed"])
@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_backbone_and_posemb(case, perturbed):
  g, meta = load_golden(case + ("__perturbed" if perturbed else ""))
  kwargs = meta["constructor_kwargs"]
  backbone_type, pe_type = kwargs["backbone_type"], kwargs["positional_embedding_type"]
  state_dict = {k: g[k] for k in meta["state_dict"]}

  # Backbone, eval mode.
  if backbone_type == "parity_backbone":
    x = g["__in__x"]  # (B, L) of +-1
    want_feat = np.swapaxes(g["__hook__backbone"][0], 1, 2)  # (B, E, L) -> (B, L, E)
  else:
    x = _nchw_to_nhwc(g["__hook__initial_rgb"][0])
    want_feat = _nchw_to_nhwc(g["__hook__backbone"][0])
  net = backbones.make_backbone(backbone_type, kwargs["d_input"], name="backbone")
  variables = torch_to_flax(state_dict, "backbone.", net, x, train=False)
  feat = net.apply(variables, x, train=False)
  assert_close(feat, want_feat, what=f"{case} backbone")
  channels = backbones.backbone_channels(backbone_type, kwargs["d_input"])
  assert feat.shape[-1] == channels

  # Positional embedding on the reference's backbone output.
  pe_mod = posemb.make_positional_embedding(pe_type, channels, jnp.float32)
  pe_vars = torch_to_flax(state_dict, "positional_embedding.", pe_mod, want_feat)
  pe = np.asarray(pe_mod.apply(pe_vars, want_feat))
  want_pe = g["__hook__positional_embedding"][0]
  want_pe = np.swapaxes(want_pe, 1, 2) if want_pe.ndim == 3 else _nchw_to_nhwc(want_pe)
  assert pe.ndim == want_feat.ndim
  assert_close(np.broadcast_to(pe, want_pe.shape), want_pe, what=f"{case} posemb")
  # What gets added must broadcast to the features' shape.
  assert np.broadcast_shapes(pe.shape, want_feat.shape) == want_feat.shape


def test_batchnorm_matches_torch_train_and_eval():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  c = 5
  bn_t = torch.nn.BatchNorm2d(c)
  with torch.no_grad():
    bn_t.weight.copy_(torch.from_numpy(rng.normal(1, 0.2, c).astype(np.float32)))
    bn_t.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, c).astype(np.float32)))
    bn_t.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.3, c).astype(np.float32)))
    bn_t.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
  bn = backbones.BatchNorm()
  variables = torch_to_flax(bn_t.state_dict(), "", bn, np.zeros((2, 3, 3, c), np.float32), True)
  apply_train = jax.jit(lambda v, x: bn.apply(v, x, False, mutable=["batch_stats"]))

  bn_t.train()
  for step in range(2):
    x = rng.normal(0.5 * step, 2.0, (3, 4, 6, c)).astype(np.float32)
    want = bn_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    want = want.detach().numpy().transpose(0, 2, 3, 1)
    got, updates = apply_train(variables, x)
    variables = {**variables, **updates}
    assert_close(got, want, tol=1e-5, what=f"train output step {step}")
    assert_close(variables["batch_stats"]["mean"], bn_t.running_mean.numpy(), tol=1e-6)
    assert_close(variables["batch_stats"]["var"], bn_t.running_var.numpy(), tol=1e-6)

  bn_t.eval()
  x = rng.normal(0, 1, (2, 3, 3, c)).astype(np.float32)
  want = bn_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
  assert_close(bn.apply(variables, x, True), want.transpose(0, 2, 3, 1), tol=1e-5)


def test_batchnorm_init_leaves_fresh_stats():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 4)) * 3 + 7
  variables = backbones.BatchNorm().init(jax.random.PRNGKey(0), x, False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(4))
  np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(4))


def test_shallow_wide_matches_torch_layers():
  """Grouped conv + GLU + BN against torch layers (train and eval)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tnn = torch.nn

  class TorchShallowWide(tnn.Module):

    def __init__(self):
      super().__init__()
      self.layers = tnn.Sequential(
          tnn.Conv2d(3, 4096, 3, stride=2, padding=1),
          tnn.GLU(dim=1),
          tnn.BatchNorm2d(2048),
          tnn.Conv2d(2048, 4096, 3, padding=1, groups=32),
          tnn.GLU(dim=1),
          tnn.BatchNorm2d(2048),
      )

  ref = TorchShallowWide()
  with torch.no_grad():
    for i in (2, 5):
      ref.layers[i].running_mean.normal_(0, 0.1)
      ref.layers[i].running_var.uniform_(0.5, 1.5)
      ref.layers[i].weight.normal_(1, 0.1)
  x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
  net = backbones.make_backbone("shallow-wide", d_input=16)
  variables = torch_to_flax(ref.state_dict(), "", net, x, train=False)

  ref.eval()
  want = ref.layers(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
  got = net.apply(variables, x, train=False)
  assert got.shape == (2, 4, 4, 2048)
  assert_close(got, want.transpose(0, 2, 3, 1), what="shallow-wide eval")

  ref.train()
  want = ref.layers(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
  got, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
  assert_close(got, want.transpose(0, 2, 3, 1), what="shallow-wide train")
  for name in ("layers_2", "layers_5"):
    idx = int(name[-1])
    stats = updates["batch_stats"][name]
    assert_close(stats["mean"], ref.layers[idx].running_mean.numpy(), tol=1e-5)
    assert_close(stats["var"], ref.layers[idx].running_var.numpy(), tol=1e-5)


def _ceil_halvings(size: int, times: int) -> int:
  for _ in range(times):
    size = -(-size // 2)
  return size


@pytest.mark.parametrize(
    "backbone_type",
    [t for t in backbones.BACKBONE_TYPES if t != "none" and not t.startswith("resnet152")]
    + ["resnet152-4"],
)
def test_backbone_output_shapes(backbone_type):
  d_input = 24
  if backbone_type == "parity_backbone":
    x = jax.ShapeDtypeStruct((2, 9), jnp.float32)
    want = (2, 9, d_input)
  else:
    x = jax.ShapeDtypeStruct((2, 39, 39, 3), jnp.float32)
    halvings = int(backbone_type[-1]) if backbone_type.startswith("resnet") else 1
    side = _ceil_halvings(39, halvings)
    want = (2, side, side, backbones.backbone_channels(backbone_type, d_input))
  net = backbones.make_backbone(backbone_type, d_input)
  out, variables = jax.eval_shape(
      lambda x: net.init_with_output(jax.random.PRNGKey(0), x, train=False), x
  )
  assert out.shape == want
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))


def _numpy_variables(abstract, seed=0):
  """Concrete variables for an abstract tree, drawn with NumPy (a real init is slow on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    if name in ("bias", "mean"):
      return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(abstract))


def test_resnet50_forward_train_and_eval():
  net = backbones.make_backbone("resnet50-2", d_input=0, name="backbone")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  abstract = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, train=False))
  assert set(abstract) == {"params", "batch_stats"}
  p = abstract["params"]
  # Bottleneck: stride on conv2 (3x3); projection shortcut in the first block of each layer.
  assert p["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
  assert p["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 256)
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert p["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 256, 512)
  assert "downsample_0" not in p["layer2_1"]
  assert "layer3_0" not in p
  variables = _numpy_variables(abstract)
  out = jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x)
  assert out.shape == (2, 4, 4, 512)
  assert np.isfinite(np.asarray(out)).all()
  train_fn = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
  out_t, updates = train_fn(variables, x)
  assert out_t.shape == out.shape and np.isfinite(np.asarray(out_t)).all()
  before = variables["batch_stats"]["layer2_0"]["bn2"]["mean"]
  after = updates["batch_stats"]["layer2_0"]["bn2"]["mean"]
  assert not np.allclose(before, after)


def test_init_distributions():
  block = backbones.BasicBlock(64)
  params = block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 64)), train=False)["params"]
  kernel = np.asarray(params["conv1"]["kernel"])  # fan_in 64 * 9
  bound = 1 / np.sqrt(64 * 9)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound

  emb = backbones.make_backbone("parity_backbone", d_input=4096)
  table = emb.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]["embedding"]["embedding"]
  assert table.shape == (2, 4096) and abs(float(np.std(table)) - 1.0) < 0.05

  pe = posemb.make_positional_embedding("multi-learnable-fourier", 8, jnp.float32)
  pe_params = pe.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8)))["params"]
  np.testing.assert_array_equal(pe_params["combination"], np.ones(10))
  for k, gamma in enumerate(np.linspace(1.0, 0.1, 10)):
    wr = np.asarray(pe_params[f"embedders_{k}"]["Wr"]["kernel"])
    assert wr.shape == (2, 128)
    np.testing.assert_allclose(np.std(wr), gamma**-2, rtol=0.2)
  mlp0 = pe_params["embedders_0"]["mlp_0"]
  assert np.abs(mlp0["bias"]).max() <= 1 / np.sqrt(256)
  np.testing.assert_array_equal(pe_params["embedders_0"]["mlp_3"]["scale"], np.ones(8))

  rot = posemb.make_positional_embedding("custom-rotational", 8, jnp.float32)
  rot_params = rot.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 8)))["params"]
  np.testing.assert_array_equal(rot_params["start_vector"], [0.0, 1.0])
  assert rot_params["projection_0"]["kernel"].shape == (4, 8)


@pytest.mark.parametrize("kind", [k for k in posemb.POSITIONAL_EMBEDDING_TYPES if k != "none"])
def test_posemb_shapes(kind):
  c = 16
  x = jnp.zeros((3, 10, c)) if kind == "custom-rotational-1d" else jnp.zeros((3, 6, 6, c))
  mod = posemb.make_positional_embedding(kind, c, jnp.float32)
  out, _ = mod.init_with_output(jax.random.PRNGKey(0), x)
  assert out.shape == (1,) + x.shape[1:]
  assert np.isfinite(np.asarray(out)).all()
  assert posemb.make_positional_embedding("none", c, jnp.float32) is None


def test_custom_rotational_rejects_non_square():
  mod = posemb.make_positional_embedding("custom-rotational", 8, jnp.float32)
  with pytest.raises(ValueError, match=r"\(2, 4, 5, 8\)"):
    mod.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 5, 8)))


def test_learnable_fourier_rejects_degenerate_grid():
  mod = posemb.make_positional_embedding("learnable-fourier", 8, jnp.float32)
  with pytest.raises(ValueError, match="2x2"):
    mod.init(jax.random.PRNGKey(0), jnp.zeros((2, 1, 5, 8)))


def test_torch_linspace_bit_exact():
  torch = pytest.importorskip("torch")
  for start, end in [(0.0, 180.0), (1.0, 0.1), (-3.3, 7.1), (1e-20, 1.0)]:
    for n in list(range(0, 130)) + [257, 1000]:
      got = posemb.torch_linspace(start, end, n)
      want = torch.linspace(start, end, n).numpy()
      assert got.dtype == np.float32 and got.shape == want.shape
      np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_unknown_types_raise():
  with pytest.raises(ValueError, match="backbone_type='resnet19-2'"):
    backbones.make_backbone("resnet19-2", 8)
  with pytest.raises(ValueError, match="backbone_type='resnet18-5'"):
    backbones.backbone_channels("resnet18-5", 8)
  with pytest.raises(ValueError, match="positional_embedding_type='rope'"):
    posemb.make_positional_embedding("rope", 8, jnp.float32)
  assert backbones.make_backbone("none", 8) is None
  assert backbones.backbone_channels("none", 8, input_channels=5) == 5
  expected = {
      "resnet18-1": 64,
      "resnet34-4": 512,
      "resnet50-1": 256,
      "resnet152-3": 1024,
      "parity_backbone": 8,
      "shallow-wide": 2048,
  }
  for name, channels in expected.items():
    assert backbones.backbone_channels(name, 8) == channels


def test_bf16_compute_keeps_f32_params():
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  for backbone_type in ("resnet18-2", "resnet50-1", "shallow-wide"):
    net = backbones.make_backbone(backbone_type, d_input=0, dtype=jnp.bfloat16)
    out, variables = jax.eval_shape(
        lambda x: net.init_with_output(jax.random.PRNGKey(0), x, train=False), x
    )
    assert out.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  for kind in ("learnable-fourier", "multi-learnable-fourier", "custom-rotational"):
    mod = posemb.make_positional_embedding(kind, 8, jnp.bfloat16)
    out, variables = jax.eval_shape(
        lambda x: mod.init_with_output(jax.random.PRNGKey(0), x),
        jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.bfloat16),
    )
    assert out.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))


def _loss_and_grads(net, batch_stats, params, x):
  def loss(params, x):
    out, updates = net.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jnp.sin(out)), (out, updates)

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


@pytest.mark.parametrize("backbone_type", ["resnet18-1", "resnet50-1"])
def test_backbone_remat_keeps_variables_and_checkpoints_every_block(backbone_type):
  """Same variable tree (so the same init, checkpoints and PyTorch import);
  every residual block is a checkpoint of its own."""
  x = jnp.ones((2, 8, 8, 3))
  plain = backbones.make_backbone(backbone_type, 0, name="backbone")
  variables = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), x, train=False))
  blocks = sum(1 for name in variables["params"] if name.startswith("layer"))
  for mode in ("convs", "block"):
    remat = backbones.make_backbone(backbone_type, 0, remat=mode, name="backbone")
    assert jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(0), x, train=False)) == variables
    grads = functools.partial(_loss_and_grads, remat)
    jaxpr = str(jax.make_jaxpr(grads)(variables["batch_stats"], variables["params"], x))
    assert jaxpr.count("remat") == blocks, mode


def test_backbone_remat_same_values_and_gradients():
  """backbone_remat changes memory, not values: same outputs, batch statistics
  and gradients (float32), training and eval."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  plain = backbones.make_backbone("resnet18-1", 0, name="backbone")
  variables = plain.init(jax.random.PRNGKey(0), x, train=False)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  run = lambda net: jax.jit(functools.partial(_loss_and_grads, net, variables["batch_stats"]))(
      variables["params"], x
  )
  (value, (out, stats)), grads = run(plain)
  eval_out = plain.apply(variables, x, train=False)
  for mode in ("convs", "block"):
    remat = backbones.make_backbone("resnet18-1", 0, remat=mode, name="backbone")
    (remat_value, (remat_out, remat_stats)), remat_grads = run(remat)
    np.testing.assert_allclose(remat_value, value, rtol=1e-5)
    close(remat_out, out)
    jax.tree.map(close, remat_stats, stats)
    jax.tree.map(close, remat_grads, grads)
    close(remat.apply(variables, x, train=False), eval_out)


def test_backbone_remat_rejects_unknown_modes():
  with pytest.raises(
      ValueError, match=r"backbone_remat='blocks': expected one of \['none', 'convs', 'block'\]"
  ):
    backbones.make_backbone("resnet18-1", 0, remat="blocks")
  # Backbones other than ResNets are small and take the option as a no-op.
  shallow = backbones.make_backbone("shallow-wide", 0, remat="block")
  assert isinstance(shallow, backbones.ShallowWide)
