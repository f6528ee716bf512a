"""A restore that fails part-way leaves no read behind (no pending task, no unraisable error).

Orbax reads the shards of every array concurrently in a fresh event loop and closes that loop as
soon as one read raises; the sibling reads used to stay pending, then call into the closed loop
when their TensorStore reads completed or were garbage-collected.
"""

import asyncio
import gc
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import checkpoint

ATTEMPTS = 8  # a leak shows in about one failed restore out of three (timing of the reads)


def _pending_tasks():
  return [t for t in gc.get_objects() if isinstance(t, asyncio.Task) and not t.done()]


def test_failed_restore_finishes_its_reads(tmp_path, monkeypatch):
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  sharding = NamedSharding(jax.make_mesh((8,), ("x",)), P("x"))
  state = {
    f"w{i}": jax.device_put(jnp.arange(8 * 4096, dtype=jnp.float32) * (i + 1), sharding)
    for i in range(6)
  }
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, state, {"step": 1})
  ckpt.save(2, state, {"step": 2})
  ckpt.wait()
  files = [p for p in (pathlib.Path(ckpt.directory) / "2" / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  abstract = checkpoint.abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
  for _ in range(ATTEMPTS):
    try:
      ckpt.restore(2, abstract)
    except Exception:  # noqa: BLE001 - which error the damaged file gives is Orbax's business
      pass
    else:
      raise AssertionError("the truncated checkpoint was read")
    assert _pending_tasks() == []
    gc.collect()
  restored, data = ckpt.restore(1, abstract)
  assert data == {"step": 1}
  for name, array in state.items():
    np.testing.assert_array_equal(restored[name], array)
  ckpt.close()
  gc.collect()
  assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable] == []
