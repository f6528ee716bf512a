#!/usr/bin/env bash
# Runs moejax.train as N processes on this machine, each with M simulated CPU devices: the
# multi-host set-up (jax.distributed, gloo collectives, per-process data) without hardware.
#
# Needs: python with moejax's requirements (set PYTHON=..., default python3), run from the repo
# root (or anywhere: the script cds there). Every process gets the same train arguments plus
#   --config.distributed.coordinator_address=127.0.0.1:PORT
#   --config.distributed.num_processes=N --config.distributed.process_id=I
# Output lines are prefixed "[process I] "; the exit status is the first non-zero one.
#
# Usage:
#   bash launch/local_multiprocess.sh --processes 2 --devices-per-process 4 [--port 12355] \
#       [--dry-run] -- --config configs/switch_base.py:tiny --workdir /tmp/run [--config.x=y ...]
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

processes=2
devices=4
port=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_multiprocess.sh: unknown option '$1' (train arguments go after --)" >&2
       usage >&2; exit 2 ;;
  esac
done
for value in "$processes" "$devices"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local_multiprocess.sh: --processes and --devices-per-process need positive integers," \
      "got '$value'" >&2
    exit 2
  fi
done
if [[ $# -eq 0 ]]; then
  echo "local_multiprocess.sh: no train arguments after --" >&2; usage >&2; exit 2
fi

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ -z "$port" ]]; then  # a free port, chosen by the OS
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

set_command() {  # cmd=(the command of process $index)
  cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
    "$PYTHON" -u -m moejax.train "$@"
    "--config.distributed.coordinator_address=127.0.0.1:$port"
    "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$index")
}

if [[ "$dry_run" == 1 ]]; then
  for ((index = 0; index < processes; index++)); do
    set_command "$@"; printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi

set -m  # each process in its own process group, so a signal reaches python and its log filter
pids=()
for ((index = 0; index < processes; index++)); do
  set_command "$@"
  (
    "${cmd[@]}" 2>&1 | sed -u "s/^/[process $index] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done

# shellcheck disable=SC2329  # called by the trap below
stop() {  # JAX catches SIGTERM (preemption notice): ask, then insist.
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 5
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  exit 143
}
trap stop INT TERM

status=0
for index in "${!pids[@]}"; do
  rc=0
  wait "${pids[$index]}" || rc=$?
  if [[ "$rc" != 0 ]]; then
    echo "local_multiprocess.sh: process $index exited with status $rc" >&2
    [[ "$status" == 0 ]] && status="$rc"
  fi
done
exit "$status"
