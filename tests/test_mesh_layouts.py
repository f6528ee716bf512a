"""Three EP/FSDP/TP mesh layouts train the tiny model with the losses of one device.

Each layout (configs/mesh_layouts.py) trains 3 steps with the explicit `all_to_all` dispatch;
the reference is one device with the `capacity` dispatch (the same function without the
exchange). Expert weights [E, D, F] must really be split: E over 'expert', D over 'fsdp',
F over 'tensor' (checked on the shard a device holds).
"""

import importlib.util

import jax
import numpy as np
import pytest

from moejax import train
from tests.helpers import tiny_config, write_corpus

STEPS = 3


def _layouts():
  spec = importlib.util.spec_from_file_location("mesh_layouts", "configs/mesh_layouts.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.LAYOUTS


LAYOUTS = _layouts()


def _config(corpus, dispatch, **mesh):
  cfg = tiny_config(corpus, **mesh)
  # 8 x 32 tokens in groups of 32: 8 groups, one per device of any 8-device layout.
  cfg.model.moe.group_size = 32
  cfg.model.moe.dispatch = dispatch
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"), num_files=2, words_per_file=3000)


@pytest.fixture(scope="module")
def one_device_losses(corpus, tmp_path_factory):
  out = train.run(
    _config(corpus, "capacity", data=1),
    str(tmp_path_factory.mktemp("one")),
    devices=jax.devices()[:1],
    progress=False,
    stop_at=STEPS,
  )
  return np.array([out["losses"][s] for s in range(1, STEPS + 1)])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_device_and_shards_experts(layout, corpus, one_device_losses, tmp_path):
  mesh = LAYOUTS[layout]
  out = train.run(
    _config(corpus, "all_to_all", **mesh), str(tmp_path / layout), progress=False, stop_at=STEPS
  )
  losses = np.array([out["losses"][s] for s in range(1, STEPS + 1)])
  np.testing.assert_allclose(losses, one_device_losses, atol=1e-4)
  assert np.all(np.isfinite(losses))
  experts = out["state"]["params"]["blocks"][1]["ffn"]["experts"]
  for name, split in (
    ("w_in", ("expert", "fsdp", "tensor")),
    ("w_out", ("expert", "tensor", "fsdp")),
  ):
    w = experts[name]
    expected = tuple(n // mesh[a] for n, a in zip(w.shape, split, strict=True))
    assert w.addressable_shards[0].data.shape == expected, (name, w.sharding.spec)
    # Each named axis with more than one device really appears in the spec.
    assert all(a in jax.tree.leaves(tuple(w.sharding.spec)) for a in split if mesh[a] > 1)
