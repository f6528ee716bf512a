"""moejax.distributed start-up order and moejax.mesh host (DCN) axes; no processes started."""

import pytest

from moejax import config_lib, distributed
from moejax import mesh as mesh_lib

SLURM = {
  "SLURM_JOB_ID": "77",
  "SLURM_STEP_NODELIST": "gpu[01-02]",
  "SLURM_NTASKS": "16",
  "SLURM_PROCID": "9",
  "SLURM_LOCALID": "1",
}


def _dist(**values):
  d = config_lib.default_config().distributed
  for k, v in values.items():
    d[k] = v
  return d


def test_explicit_config_wins_over_tpu_and_slurm():
  d = _dist(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)
  p = distributed.plan(d, environ=SLURM, on_tpu=True)
  assert p.method == "config"
  assert p.kwargs == {
    "coordinator_address": "10.0.0.2:1234",
    "num_processes": 2,
    "process_id": 1,
    "initialization_timeout": 300,
    "heartbeat_timeout_seconds": 100,
  }


def test_tpu_then_slurm_then_single():
  d = _dist(heartbeat_timeout_s=7)
  tpu = distributed.plan(d, environ=SLURM, on_tpu=True)
  assert tpu.method == "tpu" and tpu.kwargs == {
    "initialization_timeout": 300,
    "heartbeat_timeout_seconds": 7,
  }
  slurm = distributed.plan(d, environ=SLURM, on_tpu=False)
  assert slurm.method == "slurm" and slurm.kwargs["cluster_detection_method"] == "slurm"
  assert "task 9 of 16" in slurm.description
  assert "local_device_ids" not in slurm.kwargs  # 16 tasks, no node count: JAX's 1 GPU/task
  per_node = {**SLURM, "SLURM_STEP_NUM_NODES": "16", "SLURM_GPUS_ON_NODE": "8"}
  assert distributed.plan(d, per_node, False).kwargs["local_device_ids"] == list(range(8))
  per_gpu = {**per_node, "SLURM_STEP_NUM_NODES": "2"}  # 8 tasks per node: one GPU each
  assert "local_device_ids" not in distributed.plan(d, per_gpu, False).kwargs
  one_task = {**SLURM, "SLURM_NTASKS": "1"}  # e.g. an interactive allocation
  assert distributed.plan(d, environ=one_task, on_tpu=False).method == "single"
  assert distributed.plan(d, environ={}, on_tpu=False).method == "single"
  # TPU pod variables alone are enough to detect a pod.
  assert distributed.plan(d, environ={"TPU_WORKER_HOSTNAMES": "a,b"}).method == "tpu"


@pytest.mark.parametrize(
  "values, message",
  [
    (dict(coordinator_address="h:1"), "distributed.num_processes"),
    (dict(num_processes=2, process_id=0), "distributed.coordinator_address"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "needs a port"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "0..1"),
    (dict(heartbeat_timeout_s=0), "heartbeat_timeout_s=0"),
  ],
)
def test_bad_settings_are_one_line_config_errors(values, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    distributed.plan(_dist(**values), environ={}, on_tpu=False)


def test_single_process_helpers():
  assert distributed.is_writer()
  calls = []
  assert distributed.writer_first("x", lambda: calls.append(1) or 5) == 5
  assert calls == [1]
  distributed.barrier("no-op with one process")


def _shape(**sizes):
  return {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}


def test_dcn_default_puts_hosts_on_data():
  dcn = config_lib.default_config().mesh.dcn
  assert mesh_lib.resolve_dcn_shape(_shape(data=4, expert=4), dcn, 2) == _shape(data=2)
  # fsdp across 2 hosts, data across the other 2.
  dcn = dict(data=-1, fsdp=2, expert=1, tensor=1)
  assert mesh_lib.resolve_dcn_shape(_shape(data=2, fsdp=4), dcn, 4) == _shape(data=2, fsdp=2)


@pytest.mark.parametrize(
  "shape, dcn, hosts, message",
  [
    (_shape(fsdp=8), None, 2, "mesh.data=1 cannot span mesh.dcn.data=2"),
    (_shape(data=8), dict(data=3), 2, "does not spread the 2 hosts"),
    (_shape(data=8), dict(data=-1, fsdp=-1), 2, "at most one -1"),
    (_shape(data=6), dict(data=-1, expert=4), 6, "does not spread"),
  ],
)
def test_dcn_errors(shape, dcn, hosts, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    mesh_lib.resolve_dcn_shape(shape, dcn, hosts)


def test_hosts_only_on_axes_that_split_the_batch():
  """Hosts on `tensor` would hold the same batch rows and have to feed identical data."""
  batch_axes = ("data", "fsdp", "expert")
  dcn = dict(data=1, fsdp=1, expert=1, tensor=2)
  with pytest.raises(config_lib.ConfigError, match=r"spreads hosts over \['tensor'\]"):
    mesh_lib.resolve_dcn_shape(_shape(data=2, tensor=2), dcn, 2, batch_axes)
  dcn = dict(data=1, fsdp=2, expert=1, tensor=1)  # fsdp splits the batch: fine
  assert mesh_lib.resolve_dcn_shape(_shape(fsdp=2, tensor=2), dcn, 2, batch_axes)["fsdp"] == 2
