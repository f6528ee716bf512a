"""One process of tests/test_prepared_multiprocess.py (4 CPU devices, jax.distributed + gloo).

  python -m tests.prepared_rows_worker PROCESS_ID PORT MESH MIXTURE OUT.npz

Builds MESH (e.g. 'data=2,expert=4') over both processes' 8 devices as moejax.train does, takes
this process's rows of the batch sharding, reads 3 training batches and the eval batches of
MIXTURE, turns them into global arrays, gathers those back and saves everything to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from moejax import config_lib, sharding  # noqa: E402
from moejax import mesh as mesh_lib  # noqa: E402
from moejax.data import mixture, pipeline  # noqa: E402

BATCH, SEQ_LEN, SEED = 16, 8, 5  # tests/test_prepared_multiprocess.py uses the same


def main(process_id: int, port: str, layout: str, spec: str, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  shape = {a: 1 for a in sharding.MESH_AXES}
  shape.update({k: int(v) for k, v in (p.split("=") for p in layout.split(","))})
  mesh = mesh_lib.make_mesh(shape, jax.devices())
  rules = config_lib.rules_from_config(config_lib.default_config().mesh)
  batch_sharding = NamedSharding(mesh, rules.spec(("batch", "length")))
  data = mixture.open_source(
    "", spec, seq_len=SEQ_LEN, val_fraction=0.1, vocab_size=1 << 16, verify="size"
  )
  rows = pipeline.process_rows(batch_sharding, BATCH, SEQ_LEN)
  it = data.train_iterator(BATCH, SEED, rows)
  local = [next(it) for _ in range(3)] + data.eval_batches(BATCH, 2, rows)
  gathered = []
  for batch in local:
    arr = jax.make_array_from_process_local_data(batch_sharding, batch["inputs"])
    gathered.append(np.asarray(multihost_utils.process_allgather(arr, tiled=True)))
  np.savez(
    out,
    rows=np.asarray(rows),
    local=np.stack([b["inputs"] for b in local]),
    gathered=np.stack(gathered),
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), *sys.argv[2:])
