#!/usr/bin/env bash
# The MoE-X chess experiment (docs/MOEX.md), CPU-sized: five models on the same stockfish games
# and the same characters per step, then interpretability metrics and a table.
#
#   bash moejax/proj/moex/experiment.sh OUT_DIR [STEPS]
#
# STEPS (default 400) is each from-scratch model's training steps (16 x 256 characters each); the
# upcycled MoE-X continues the dense ReLU run for STEPS/2 steps. On a 2-core CPU the runs go in two
# lanes at once, each process pinned to one core with single-threaded XLA: measured here, two such
# processes train more characters/s than one process using both cores (docs/MOEX.md).
# MOEX_MODELS (default all five) picks models, MOEX_FLAGS adds flags to every run, e.g. another
# seed: MOEX_MODELS="dense_relu moex_scratch" MOEX_FLAGS=--config.train.seed=1 bash ... OUT2
# Results: OUT_DIR/<model>/{eval.json,interpret_2.json}, then
#   python -m moejax.proj.moex.table OUT_DIR   (markdown table + docs/moex_results.json)
set -euo pipefail

out=${1:?usage: experiment.sh OUT_DIR [STEPS]}
steps=${2:-400}
games=${MOEX_GAMES:-5000}
layer=${MOEX_LAYER:-2}
python=${PYTHON:-python}
models=" ${MOEX_MODELS:-dense_gelu dense_relu switch moex_scratch moex_upcycled} "
read -r -a extra <<< "${MOEX_FLAGS:-}"
mkdir -p "$out"
export MOEJAX_CHESS_CACHE=${MOEJAX_CHESS_CACHE:-$out/games}
cores=$(nproc)

# Shared settings: the same games, steps and schedule for every model.
common=(--config.data.source="chess:stockfish:$games" --config.train.steps="$steps"
        --config.train.eval_every=$((steps / 2)) --config.train.checkpoint_every=$((steps / 2))
        "${extra[@]}")

# train NAME CONFIG [extra flags...]; then evaluate and interpret it. Skips a finished model.
run_model() {
  local name=$1 config=$2
  shift 2
  local dir=$out/$name
  [[ $models == *" $name "* ]] || return 0
  if [[ ! -f $dir/interpret_$layer.json ]]; then
    $python -m moejax.train --config "$config" --workdir "$dir" "${common[@]}" "$@" \
      > "$out/$name.train.log" 2>&1
    $python -m moejax.evaluate --workdir "$dir" --json "$dir/eval.json" > "$out/$name.eval.log" 2>&1
    $python -m moejax.proj.moex.interpret --workdir "$dir" --layer "$layer" --train-games 800 \
      --val-games 250 > "$out/$name.interpret.log" 2>&1
  fi
  echo "$(date +%T) $name done: $(tail -n 1 "$out/$name.interpret.log")"
}

# Games once, before the lanes start (both lanes read the cache).
$python -c "from moejax.proj.moex import chess; chess.load_games(chess.parse_spec('chess:stockfish:$games'))"

lane_a() {
  run_model dense_relu configs/moex_chess.py:dense_relu_cpu
  run_model moex_upcycled configs/moex_chess.py:cpu --config.init.from_dense="$out/dense_relu" \
    --config.init.from_dense_noise=0.01 --config.model.moe.d_expert=1024 \
    --config.train.steps=$((steps / 2)) --config.train.eval_every=$((steps / 4)) \
    --config.train.checkpoint_every=$((steps / 4))
  run_model moex_scratch configs/moex_chess.py:cpu
}
lane_b() {
  run_model dense_gelu configs/moex_chess.py:dense_gelu_cpu
  run_model switch configs/moex_chess.py:switch_cpu
}

if ((cores >= 2)); then
  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  (taskset -cp 0 "$BASHPID" > /dev/null; lane_a) &
  pid_a=$!
  (taskset -cp 1 "$BASHPID" > /dev/null; lane_b) &
  pid_b=$!
  wait "$pid_a"
  wait "$pid_b"
else
  lane_a
  lane_b
fi
echo "all models done: python -m moejax.proj.moex.table $out"
