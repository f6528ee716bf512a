"""The router families added on the router seam, with every dispatch that applies to them: the
first training losses on 1 device equal those on the {data 2, expert 4} mesh (8 devices) within
1e-4. The capacity and all_to_all dispatches compute the same function, so both 8-device runs
are compared with one 1-device capacity run."""

import jax
import numpy as np
import pytest

from moejax import train
from tests.family_configs import family_config
from tests.helpers import write_corpus

STEPS = 3
# (router, family options, group layout, dispatches). A dispatch with capacity competition
# (several experts per token, or batch-prioritized) routes by position to stay causal.
CASES = [
  ("hash", {}, "sequence", ("capacity", "dropless")),
  ("top_p", {}, "sequence", ("dropless",)),
  ("top_p", {}, "position", ("capacity",)),
  ("relu", {}, "sequence", ("dropless",)),
  ("relu", {}, "position", ("capacity",)),
  ("random", {}, "sequence", ("capacity", "dropless")),
  ("autonomy", {}, "sequence", ("capacity", "dropless")),
  ("switch", {"batch_prioritized": True}, "position", ("capacity",)),
  ("smear", {}, "sequence", ("none",)),  # computes its own output: no dispatch
  ("peer", {}, "position", ("none",)),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus, router, options, layout, dispatch, **mesh):
  cfg = family_config(router, corpus, **mesh)
  moe = cfg.model.moe
  if dispatch != "none":
    moe.dispatch = dispatch
  if router != "peer":  # PEER's recipe groups one position of every sequence
    # 8 groups (all_to_all splits them over the 8 devices of the batch axes).
    moe.group_layout, moe.group_size = layout, 32 if layout == "sequence" else 8
  for key, value in options.items():
    moe[router][key] = value
  # Expert-parallel dropless drops the pairs over its static per-destination bound, which a
  # skewed routing reaches at the default factor 2 (THOR's per-sequence draw sends a device's
  # whole 32-token group to one expert: half its pairs overflowed). A bound of the expert
  # shards (4) holds a device's every pair, so the 8-device run computes the 1-device function.
  moe.exchange_factor = 4.0
  cfg.train.steps = 8
  return cfg


def _losses(cfg, workdir, devices=None):
  summary = train.run(cfg, str(workdir), devices=devices, progress=False, stop_at=STEPS)
  return np.array([summary["losses"][s] for s in range(1, STEPS + 1)])


@pytest.mark.parametrize(
  "router, options, layout, dispatches",
  CASES,
  ids=[f"{c[0]}-{c[2]}-{'+'.join(c[3])}" for c in CASES],
)
def test_one_device_equals_data2_expert4(corpus, tmp_path, router, options, layout, dispatches):
  for dispatch in dispatches:
    single = _config(corpus, router, options, layout, dispatch, data=1)
    one = _losses(single, tmp_path / f"{dispatch}_one", devices=jax.devices()[:1])
    assert np.all(np.isfinite(one))
    parallel = ("capacity", "all_to_all") if dispatch == "capacity" else (dispatch,)
    for dispatch_8 in parallel:
      cfg = _config(corpus, router, options, layout, dispatch_8, data=2, expert=4)
      eight = _losses(cfg, tmp_path / f"{dispatch_8}_eight")
      np.testing.assert_allclose(one, eight, atol=1e-4, err_msg=f"{router} {dispatch_8}")
