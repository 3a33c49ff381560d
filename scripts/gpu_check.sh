#!/usr/bin/env bash
# The GPU checks, in one call on a machine with CUDA (e.g. a lent H100; see DEVELOPERS.md):
#   scripts/gpu_check.sh [OUT_DIR] [grid epochs]
# 1. installs wheels carried in .whl/ (mlflow and what the machine lacks) into /tmp/site, if any;
# 2. runs the gpu-marked tests; 3. `rnnbench bench --device cuda` into OUT_DIR;
# 4. with a grid epoch limit: the chung2014_music grid, batched, timed (GRID_GPU.md's measurement).
set -u
out=${1:-results/bench}
epochs=${2:-}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ASYNC_LOGGING=false
export RNNBENCH_DATA_DIR=${RNNBENCH_DATA_DIR:-$PWD/.gpudata}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$out/gpu.db}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "=== tests marked gpu"
timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -5
echo "=== bench"
timeout 300 python3 -m rnnbench.cli bench --device cuda --out "$out" 2>&1 | tail -3
if [ -n "$epochs" ]; then
  echo "=== chung2014_music grid, max_epochs=$epochs"
  t0=$(date +%s)
  python3 -m rnnbench.cli sweep experiments/chung2014_music.yaml "train.max_epochs=$epochs" --batch-models on --no-progress 2>&1 | tail -5
  echo "grid wall seconds: $(( $(date +%s) - t0 ))"
fi
