r"""Train an MoE language model, or compile its train step for a simulated pod (--dry_run).

  python -m moejax.train --config configs/switch_base.py:tiny --workdir /tmp/run \
      [--config.model.moe.router=top_k --config.train.steps=500 ...]
  python -m moejax.train --config configs/switch_base.py --dry_run --devices 64 \
      --device tpu-v5e [--dry_run_json report.json] [--config.mesh.expert=64 ...]

Reads top to bottom in the order data flows: Config, Mesh, Model + optimizer (abstract),
Memory pre-flight, Data, Init, Step, Restore, Loop. A rerun with the same workdir resumes from
the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from moejax import (
  checkpoint,
  cli,
  config_lib,
  distributed,
  dry_run,
  errors,
  faults,
  memory,
  paths,
  training,
)
from moejax import metrics as metrics_lib
from moejax import upcycle as upcycle_lib
from moejax.data import mixture, pipeline


def run(cfg, workdir: str, *, devices=None, progress: bool = True, stop_at: int | None = None):
  """Trains (or resumes) the run in `workdir`; returns a summary with per-step losses.

  Args:
    cfg: a config from configs/ (validated here).
    workdir: run directory; an existing checkpoint there is resumed.
    devices: the devices of the mesh (default: all).
    progress: show a progress bar.
    stop_at: stop (with a checkpoint) after this step, as if interrupted; the learning-rate
      schedule still follows `train.steps`.
  """
  # ---------------------------------------------------------------- Config
  devices = jax.devices() if devices is None else list(devices)
  config_lib.import_extensions(cfg.extensions)  # data-source kinds a project registers
  # Bad data is refused before anything is traced or compiled.
  pipeline.check_source(cfg.data.source, vocab_size=cfg.model.vocab_size)
  if cfg.data.mixture.strip():
    mixture.parse_mixture(cfg.data.mixture)
  program = training.program_for(cfg, devices)  # validates cfg; abstract, nothing allocated
  mesh, mesh_shape, rules = program.mesh, program.mesh_shape, program.rules
  if cfg.model.attention_impl == "tpu_splash" and devices[0].platform != "tpu":
    raise errors.ConfigError(
      f"model.attention_impl='tpu_splash' needs TPU devices (these are {devices[0].platform}); "
      "use 'auto' (picks the kernel by platform)"
    )
  t = cfg.train
  workdir = paths.workdir(workdir)
  is_writer = jax.process_index() == 0

  # ---------------------------------------------------------------- Mesh
  say = print if is_writer else (lambda *a, **k: None)
  say(f"moejax: mesh {mesh_shape} over {len(devices)} {devices[0].platform} devices", flush=True)

  # ---------------------------------------------------------------- Model + optimizer (abstract)
  abs_state, state_shardings = program.abs_state, program.state_shardings
  num_params = program.num_params

  # ---------------------------------------------------------------- Memory pre-flight
  estimate = memory.estimate_memory_bytes(abs_state, cfg, mesh_shape, rules)
  if t.memory_limit_gib is not None:
    limit, source = t.memory_limit_gib * 2**30, "train.memory_limit_gib"
  else:
    limit, source = memory.device_memory_bytes(devices[0])
  memory.check_memory(estimate, limit, source, mesh_shape)
  say(
    f"moejax: {num_params / 1e6:.1f}M parameters; memory pre-flight "
    f"{estimate['total'] / 2**30:.2f} GiB per device of {limit / 2**30:.1f} GiB ({source})",
    flush=True,
  )

  upcycling = None  # sparse upcycling: checked before any data is loaded or step compiled
  if cfg.init.from_dense:
    upcycling = upcycle_lib.prepare(
      cfg, workdir, nnx.to_pure_dict(program.abs_params), program.param_shardings
    )
  # A checkpoint of another model is a user error, found before data or compilation. One of the
  # other parameter layout (scan_layers changed) is read as saved and converted.
  ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
  saved_layout = training.saved_layout(ckpt)
  abs_saved = training.state_as_saved(cfg, program, saved_layout)
  saved_cfg = checkpoint.read_config(workdir)
  if saved_cfg and abs_saved is not abs_state:  # the layout is not a difference of the arrays
    saved_cfg["model"]["scan_layers"] = cfg.model.scan_layers
  ckpt.check_compatible(abs_saved, saved_cfg, cfg.to_dict())
  # After the check (it compares with the previous run's file); evaluate / generate read it too.
  checkpoint.write_config(workdir, cfg.to_dict())

  # ---------------------------------------------------------------- Data
  build = lambda: pipeline.build_dataset(
    cfg.data, workdir=str(workdir), vocab_size=cfg.model.vocab_size, seq_len=t.seq_len
  )
  data = distributed.writer_first("data", build)  # process 0 writes tokenizer + token cache first
  batch_sharding = program.batch_sharding
  # This process's rows of every global batch, from the batch sharding (not assumed).
  rows = pipeline.process_rows(batch_sharding, t.batch_size, t.seq_len)
  train_iter = data.train_iterator(t.batch_size, t.seed, rows)
  to_global = lambda batch: {
    k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v, np.int32))
    for k, v in batch.items()
  }
  eval_batches = [
    to_global(b) for b in data.eval_batches(t.batch_size, cfg.data.eval_batches, rows)
  ]

  with jax.set_mesh(mesh):
    # -------------------------------------------------------------- Step
    step_fn, eval_fn, init_state = program.step_fn, program.eval_fn, program.init_state

    # -------------------------------------------------------------- Init or restore
    restored = ckpt.restore_latest(abs_saved, say=lambda m: say(m, flush=True))
    if restored is None and upcycling is not None:
      state = upcycle_lib.init_state(upcycling, init_state, state_shardings)
      say(f"moejax: upcycled from the dense checkpoint {upcycling.directory} step {upcycling.step}")
    elif restored is None:
      state = jax.jit(init_state, out_shardings=state_shardings)()
    else:
      latest, state, data_state = restored
      state = training.to_program_layout(cfg, program, state)
      train_iter.set_state(data_state)
      say(f"moejax: resumed from step {latest} ({ckpt.directory})", flush=True)
    start = int(jax.device_get(state["step"]))

    # -------------------------------------------------------------- Loop
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_writer)
    baseline = math.exp(data.unigram_entropy_nats)
    losses, last_eval = {}, None
    tokens_per_step = t.batch_size * t.seq_len
    bar = _progress_bar(progress and is_writer, start, t.steps)
    tick, tick_step = time.perf_counter(), start
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    monitor, stop = faults.NonFiniteMonitor(t.nonfinite_policy), faults.StopSignal()
    # The handlers are restored, the last save committed (ckpt.close) and the bar closed (so an
    # error prints on a line of its own) also on an error.
    with stop, contextlib.closing(ckpt), bar or contextlib.nullcontext():
      for step in range(start, end):
        state, metrics = step_fn(state, to_global(next(train_iter)))
        losses[step + 1] = metrics["loss"]
        done = step + 1
        monitor.add(done, metrics)
        stopping = stop.should_stop(done)
        end = done if stopping else end
        if done % t.log_every == 0 or done == t.steps:
          values = jax.device_get(metrics)
          values[faults.SKIPPED_KEY] = monitor.check()
          now = time.perf_counter()
          values["tokens_per_second"] = (done - tick_step) * tokens_per_step / (now - tick)
          values.update(data.token_counts(done, t.batch_size))  # tokens read per source
          tick, tick_step = now, done
          logged = writer.write(done, values)
          if bar is not None:
            bar.set_postfix(
              loss=f"{logged['loss']:.3f}", tok_s=f"{logged['tokens_per_second']:.0f}"
            )
        if done % t.eval_every == 0 or done == t.steps:
          last_eval = _evaluate(eval_fn, state, eval_batches)
          writer.write(done, {**last_eval, "unigram_perplexity": baseline})
          if bar is not None:
            bar.write(
              f"step {done}: eval_loss {last_eval['eval_loss']:.4f} "
              f"eval_perplexity {last_eval['eval_perplexity']:.2f} "
              f"(unigram baseline {baseline:.2f})"
            )
        if done % t.checkpoint_every == 0 or done == end:
          monitor.check()  # under 'halt', never save a poisoned state
          ckpt.save(done, state, train_iter.get_state())
        if bar is not None:
          bar.update(1)
        if stopping:
          break
    if bar is not None:
      bar.close()
    writer.close()

  return {
    "losses": {k: float(v) for k, v in jax.device_get(losses).items()},
    "eval": last_eval,
    "unigram_perplexity": baseline,
    "num_params": num_params,
    "state": state,
    "mesh": mesh,
    "stopped_by": stop.received,
    "last_step": int(jax.device_get(state["step"])),
  }


def _evaluate(eval_fn, state, batches) -> dict:
  nll, count = 0.0, 0.0
  for batch in batches:
    b_nll, b_count = eval_fn(state, batch)
    nll, count = nll + b_nll, count + b_count
  loss = float(jax.device_get(nll / count))
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}


def _progress_bar(enabled: bool, start: int, total: int):
  if not enabled:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


# -------------------------------------------------------------------- command line
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, optionally with a preset: configs/switch_base.py:tiny."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: logs, tokenizer, checkpoints.")
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Compile the train step for --devices simulated CPU devices and report "
  "XLA's memory per device beside the pre-flight estimate; nothing is allocated or trained.",
)
_DEVICES = flags.DEFINE_integer("devices", 8, "Dry run: number of simulated devices.")
_DEVICE = flags.DEFINE_string(
  "device",
  None,
  f"Dry run: compare with this device's memory ({', '.join(dry_run.DEVICE_MEMORY_GIB)}).",
)
_DEVICE_MEMORY_GIB = flags.DEFINE_float(
  "device_memory_gib", None, "Dry run: compare with this much memory per device (GiB)."
)
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", None, "Dry run: also write the report here.")


def main_dry_run(cfg) -> None:
  """`--dry_run`: compile for simulated devices, print the memory table (and write the JSON)."""
  device_bytes, device_name = dry_run.device_memory(_DEVICE.value, _DEVICE_MEMORY_GIB.value)
  dry_run.use_simulated_devices(_DEVICES.value)
  report = dry_run.dry_run(cfg, jax.devices("cpu"), device_bytes, device_name)
  print(dry_run.format_report(report, config_flags.get_config_filename(flags.FLAGS["config"])))
  if _DRY_RUN_JSON.value:
    dry_run.write_json(report, _DRY_RUN_JSON.value)


def main(argv):
  del argv
  cfg = _CONFIG.value
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and grain are chatty at INFO
  if cfg is not None and _DRY_RUN.value:
    main_dry_run(cfg)
    return
  if cfg is None or _WORKDIR.value is None:
    raise app.UsageError("both --config and --workdir are required; see --help")
  distributed.initialize(cfg.distributed)  # before anything touches the devices
  summary = run(cfg, _WORKDIR.value)
  if summary["stopped_by"]:
    print(
      f"moejax: stopped by {summary['stopped_by']} at step {summary['last_step']}; "
      "checkpoint saved, rerun the same command to resume"
    )
    return
  ev = summary["eval"] or {}
  print(
    f"moejax: done. eval_loss {ev.get('eval_loss', float('nan')):.4f} "
    f"eval_perplexity {ev.get('eval_perplexity', float('nan')):.2f} vs unigram baseline "
    f"perplexity {summary['unigram_perplexity']:.2f}; {summary['num_params'] / 1e6:.1f}M params"
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing in which a bad --config (a missing file, an unknown or misspelt key, a
  value of the wrong type, an error of the config file's own checks) is a user error."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, errors.UserError, AttributeError, KeyError, TypeError) as e:
    message = " ".join(str(e).replace("\\n", " ").split())
    raise errors.ConfigError(f"command line: {message}") from e


if __name__ == "__main__":
  if any(arg in ("-h", "--help") for arg in sys.argv[1:]):  # absl exits 1 on --help; we exit 0
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)
  app.run(lambda argv: cli.run(main, argv), flags_parser=lambda argv: cli.run(parse_flags, argv))
