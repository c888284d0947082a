#!/usr/bin/env bash
# The main job on a GPU machine, in one prepared command:
#
#   bash benchmarks/accelerator.sh          # install jax[cuda12], torch and Liger-Kernel, then run
#   bash benchmarks/accelerator.sh --dry    # the same plumbing on tiny shapes, on whatever JAX runs here
#
# It runs every section of `python -m benchmarks.run` at sizes an 80-140 GB GPU suits, in bfloat16 and
# float32, and writes results.json, results.md and results.png per dtype under $OUT (default
# build/accelerator/), with XLA's bytes accessed per logit for the logit-level and fused paths. The
# full run is sized to finish within 10 minutes on an H100/H200-class GPU.
#
# Environment: PYTHON=/path/to/python uses that interpreter as it is (nothing installed); otherwise a
# virtual environment is made in $VENV (default .venv-accelerator). OUT sets the results folder.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry" ]; then
  dry=1
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--dry]" >&2
  exit 2
fi
out=${OUT:-build/accelerator}

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
else
  venv=${VENV:-.venv-accelerator}
  python3 -m venv "$venv"
  py=$venv/bin/python
  "$py" -m pip install -q --upgrade pip
  if [ "$dry" = 1 ]; then
    "$py" -m pip install -q -e '.[bench]'
  else
    # The newest torch (the torch extra) with Liger-Kernel; the liger extra pins torch 2.13 for the tests.
    "$py" -m pip install -q -e '.[bench,torch]' 'liger-kernel==0.8.5' 'jax[cuda12]'
  fi
fi

if [ "$dry" = 1 ]; then
  sizes=(--logits 64x512 --step 64x512 --fused 64x32x512 --repeats 2 --memory-tokens 64 --memory-dv 32x512)
else
  # Logits of 1-4 GiB in float32, heads of d 4096 and V 131072 (a Llama-3-sized vocabulary).
  sizes=(--logits 16384x32768,4096x131072 --step 16384x32768 --fused 16384x4096x131072 --repeats 3
    --memory-tokens 8192,16384 --memory-dv 4096x131072)
fi

"$py" -c 'import jax; print("devices:", jax.devices())'
for dtype in bfloat16 float32; do
  "$py" -m benchmarks.run "${sizes[@]}" --dtype "$dtype" --out "$out/$dtype"
done
echo "wrote $out/bfloat16 and $out/float32"
