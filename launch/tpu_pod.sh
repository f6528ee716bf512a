#!/usr/bin/env bash
# Trains moejax on every worker of a Cloud TPU VM pod slice (e.g. v4-32 = 4 hosts).
#
# Needs: the gcloud CLI, logged in, with a project set; this repo checked out here. Each worker
# gets a copy of the repo in ~/moejax, installs requirements + jax[tpu], and runs the same
# `python -m moejax.train` command; moejax/distributed.py detects the pod (no coordinator flags).
# The workdir must be a file system every worker shares (NFS / Filestore / a gcsfuse mount):
# Orbax writes each host's shards of a checkpoint there.
#
# Usage:
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--create --accelerator-type v4-32 \
#       --version tpu-ubuntu2204-base] [--workers N] [--skip-install] [--dry-run] \
#       -- --config configs/switch_base.py --workdir /mnt/shared/run [--config.x=y ...]
# --dry-run prints the gcloud commands instead of running them. Logs of every worker are
# collected into ./tpu_logs/NAME/worker_<i>.log when training ends (or fails).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
fail() { echo "tpu_pod.sh: $*" >&2; usage >&2; exit 2; }

tpu=""
zone=""
create=0
accelerator="v4-32"
version="tpu-ubuntu2204-base"
workers=""
install=1
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --skip-install) install=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) fail "unknown option '$1' (train arguments go after --)" ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && $# -gt 0 ]] || fail "--tpu, --zone and train arguments after -- are required"
cd "$(dirname "$0")/.."

run() {  # prints the command; runs it unless --dry-run
  printf '%q ' "$@"; echo
  if [[ "$dry_run" == 0 ]]; then "$@"; fi
}
tpu_args=(--zone "$zone")

if [[ "$create" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$tpu" "${tpu_args[@]}" \
    --accelerator-type "$accelerator" --version "$version"
fi
if [[ -z "$workers" ]]; then  # one network endpoint per worker (host)
  if [[ "$dry_run" == 1 ]]; then
    workers=1
    echo "# --dry-run: assuming --workers 1 (pass --workers N to see N log collections)"
  else
    workers="$(gcloud compute tpus tpu-vm describe "$tpu" "${tpu_args[@]}" \
      --format='value(networkEndpoints.len())')"
  fi
fi

run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${tpu_args[@]}" --command "mkdir -p ~/moejax"
run gcloud compute tpus tpu-vm scp --recurse --worker=all "${tpu_args[@]}" \
  moejax configs launch requirements.txt requirements-data.txt "$tpu:~/moejax/"
if [[ "$install" == 1 ]]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${tpu_args[@]}" --command \
    "cd ~/moejax && python3 -m pip install -q -r requirements.txt 'jax[tpu]>=0.10.2,<0.11' && python3 -m pip install -q --no-deps -r requirements-data.txt"
fi

train_command="cd ~/moejax && python3 -m moejax.train $(printf '%q ' "$@")> ~/moejax/train.log 2>&1"
status=0
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${tpu_args[@]}" \
  --command "$train_command" || status=$?

[[ "$dry_run" == 1 ]] || mkdir -p "tpu_logs/$tpu"
for ((i = 0; i < workers; i++)); do
  printf '%q ' gcloud compute tpus tpu-vm ssh "$tpu" "--worker=$i" "${tpu_args[@]}" \
    --command "cat ~/moejax/train.log"; echo "> tpu_logs/$tpu/worker_$i.log"
  if [[ "$dry_run" == 0 ]]; then
    gcloud compute tpus tpu-vm ssh "$tpu" "--worker=$i" "${tpu_args[@]}" \
      --command "cat ~/moejax/train.log" > "tpu_logs/$tpu/worker_$i.log" || true
  fi
done
if [[ "$status" != 0 ]]; then
  echo "tpu_pod.sh: training failed (status $status); see tpu_logs/$tpu/" >&2
fi
exit "$status"
