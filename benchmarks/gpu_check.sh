#!/usr/bin/env bash
# The accelerator check in one command, from the checkout's root or anywhere:
#   bash benchmarks/gpu_check.sh              # on the GPU machine; output for docs/PERFORMANCE.md
#   bash benchmarks/gpu_check.sh --cpu-smoke  # tiny sizes on CPU (CI runs it)
# Wheels carried in .whl/ (benchmarks/prepare_wheels.sh; MOEJAX_WHEELS names another folder) are
# installed first, without dependencies, into a folder put at the front of PYTHONPATH: the
# machine has no network, and its image lacks some of moejax's requirements. They are built for
# Python 3.12, so they are installed only when the interpreter is 3.12.
# PYTHON names the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${MOEJAX_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    site="$(mktemp -d)/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(find "$WHEELS" -name '*.whl' | wc -l) wheels from $WHEELS" >&2
  else
    echo "gpu_check: $WHEELS holds Python 3.12 wheels; $("$PY" -V) does not use them" >&2
  fi
fi
if [[ " $* " == *" --cpu-smoke "* ]]; then
  export JAX_PLATFORMS=cpu
fi
exec "$PY" -m benchmarks.gpu_check "$@"
