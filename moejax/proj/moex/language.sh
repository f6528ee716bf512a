#!/usr/bin/env bash
# The MoE-X language table (docs/MOEX.md): validation perplexity on the default corpus of dense,
# Switch and MoE-X at equal active compute, the `tiny` size (4 layers, d_model 256, vocab 2048; in
# the MoE models every other layer's MLP is an MoE layer, as in configs/switch_base.py:tiny).
#
#   bash moejax/proj/moex/language.sh OUT_DIR [STEPS]
#
# Equal active compute: the dense MLP is d_ff = 512 wide; Switch runs 1 of 8 experts of width 512;
# MoE-X runs 2 of 8 ReLU experts of width 256 with sparsity-aware routing. Same data, steps and
# schedule (STEPS, default 300, of 16 x 128 tokens). Then:
#   python -m moejax.proj.moex.table --language OUT_DIR
set -euo pipefail

out=${1:?usage: language.sh OUT_DIR [STEPS]}
steps=${2:-300}
python=${PYTHON:-python}
mkdir -p "$out"
common=(--config.train.steps="$steps" --config.train.eval_every="$steps"
        --config.train.checkpoint_every="$steps")

run_model() {
  local name=$1 config=$2
  shift 2
  if [[ ! -f $out/$name/eval.json ]]; then
    $python -m moejax.train --config "$config" --workdir "$out/$name" "${common[@]}" "$@" \
      > "$out/$name.train.log" 2>&1
    $python -m moejax.evaluate --workdir "$out/$name" --json "$out/$name/eval.json" \
      > "$out/$name.eval.log" 2>&1
  fi
  echo "$(date +%T) $name: $(head -n 1 "$out/$name.eval.log")"
}

run_model dense_gelu configs/dense.py:tiny
run_model dense_relu configs/dense.py:tiny --config.model.activation=relu
run_model switch configs/switch_base.py:tiny
# Top-2 is not causal inside a sequence's routing group: MoE-X routes each position across the
# batch's 16 sequences (group_layout 'position'), dropless, as the chess recipes do.
run_model moex configs/switch_base.py:tiny --config.model.moe.router=moex \
  --config.model.activation=relu --config.model.moe.top_k=2 --config.model.moe.d_expert=256 \
  --config.model.moe.group_layout=position --config.model.moe.group_size=16 \
  --config.model.moe.dispatch=dropless
