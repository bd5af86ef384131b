#!/usr/bin/env bash
# The checks and measurements we run on a lent GPU machine (one H100/H200,
# 16 cores, no network), in one call:
#   1. the machine: cores, GPU, torch and NCCL;
#   2. tests/test_cuda.py (CUDA runs of the runtime against CPU runs);
#   3. benchmarks/fidelity.py in full on the CPU cores: the fidelity target
#      is stated for K no larger than the core count, and this machine has
#      a core per rank with cores to spare (it was not quieter, though:
#      see benchmarks/results/h200/README.md);
#   4. benchmarks/throughput.py --quick and fidelity.py (one repeat) with
#      --device cuda;
#   5. a torchrun launch of `bpsim run` with ranks computing on the GPU.
# Results go to $OUT (default ./gpu_out). Without network the machine lacks
# simpy: carry its wheel in .whl/ (see docs/runtime.md, section GPUs).
#   bash benchmarks/gpu_box.sh [REPEATS]   # its first version took 8.6 min on an H200 box,
#                                          # before rank start-up got 2 s faster per run
# (REPEATS, default 3, is for the CPU fidelity run; every CUDA run starts
# its ranks' CUDA contexts anew, so the CUDA fidelity run measures once.)
set -u
OUT=${OUT:-gpu_out}
REPEATS=${1:-3}
mkdir -p "$OUT/cuda" "$OUT/cpu"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
step() { echo; echo "=== $* ($(date +%T))"; }
{
step machine
echo "cores: $(nproc --all) online, $($PY -c "import os; print(len(os.sched_getaffinity(0)))") usable"; nvidia-smi -L; uptime
$PY -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.device_count(), 'nccl', d.is_nccl_available())"
step tests/test_cuda.py
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
step fidelity on the CPU cores, $REPEATS repeats
timeout 330 $PY benchmarks/fidelity.py --repeats "$REPEATS" --out "$OUT/cpu"
step throughput --device cuda --quick
timeout 75 $PY benchmarks/throughput.py --quick --device cuda --out "$OUT/cuda"
step fidelity --device cuda, 1 repeat
timeout 150 $PY benchmarks/fidelity.py --repeats 1 --device cuda --out "$OUT/cuda"
step torchrun
timeout 45 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m bpsim run dgl \
    --workers 2 --steps 30 --device cuda
step done
} 2>&1 | tee "$OUT/log.txt"
