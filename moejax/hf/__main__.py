r"""Import and export Hugging Face MoE checkpoints.

  python -m moejax.hf import --model HF_DIR --workdir RUN [--mesh data=2,expert=4]
  python -m moejax.hf export --workdir RUN [--step N] --out HF_DIR

`import` reads config.json and the safetensors files (a sharded index included) with numpy alone
and writes a moejax run directory: config.json, an Orbax checkpoint at step 0 and RUN/hf/ (the
HF config and tokenizer files). `moejax.train` continues it (--config configs/hf_import.py:RUN),
`moejax.evaluate` and `moejax.generate` read it like any run. `export` writes config.json and
sharded safetensors that `transformers` loads with `from_pretrained`. Families: mixtral,
qwen3_moe, qwen2_moe, olmoe, deepseek_v3 (moejax/hf/families/).
"""

from __future__ import annotations

import argparse

from moejax import cli, restore
from moejax.hf import convert


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moejax.hf", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="HF model directory -> moejax run directory")
  imp.add_argument("--model", required=True, help="directory with config.json + *.safetensors")
  imp.add_argument("--workdir", required=True, help="the new run directory (must be empty)")
  imp.add_argument("--mesh", default="", help="e.g. data=2,expert=4 (default: the config's)")
  exp = commands.add_parser("export", help="moejax run directory -> HF model directory")
  exp.add_argument("--workdir", required=True, help="a run made by `import` (then trained)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  exp.add_argument("--out", required=True, help="the new HF model directory (must be empty)")
  args = parser.parse_args(argv)
  if args.command == "import":
    cfg = convert.import_model(args.model, args.workdir, restore.parse_mesh(args.mesh))
    m = cfg.model
    print(
      f"moejax: imported {args.model} ({m.num_layers} layers, d_model {m.d_model}, "
      f"{m.moe.num_experts} experts, top-{m.moe.top_k}) into {args.workdir}"
    )
  else:
    files = convert.export_run(args.workdir, args.out, step=args.step)
    print(f"moejax: exported {args.workdir} to {args.out} ({len(files)} safetensors file(s))")


if __name__ == "__main__":
  cli.run(main)
