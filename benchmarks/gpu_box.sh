#!/usr/bin/env bash
# The checks we run on a lent GPU machine (no network), in one call of at
# most 8 minutes (the sum of the timeouts below is 440 s):
#   1. the machine: cores, GPUs, torch and NCCL;
#   2. tests/test_cuda.py (CUDA runs of the runtime against CPU runs);
#   3. bpsim run bp, dgl and gpipe with one rank per GPU: W = min(GPUs, 4)
#      ranks over NCCL when there are two GPUs or more; with one GPU, bp
#      and dgl run 2 ranks over gloo (NCCL cannot share a GPU) and gpipe
#      runs both blocks in one rank;
#   4. a check over those traces that the time a rank spends waiting for a
#      message is drawn as `wait` spans: every rank but the first waits in
#      bp, dgl and gpipe, and in bp rank 0 waits at least half as long as
#      rank 1 computes (it has nothing to do until the gradient comes back);
#      a CUDA timing that folded the waits into compute spans fails here;
#   5. a torchrun launch with one rank per GPU;
#   6. benchmarks/throughput.py --quick --device cuda.
#   FULL=1 bash benchmarks/gpu_box.sh   # adds the fidelity runs (about 8 min more)
# Results go to $OUT (default ./gpu_out); the script exits non-zero when a
# step failed. Without network the machine lacks simpy: carry its wheel in
# .whl/ (pip download --no-deps -d .whl simpy); the script installs it.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/cuda" "$OUT/cpu" "$OUT/runs"
rm -f "$OUT"/runs/*.json            # the check below reads this call's traces only
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
FAILED=0
step() { echo; echo "=== $* ($(date +%T))"; }
check() { "$@" || { echo "FAILED ($?): $*"; FAILED=1; }; }
GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -ge 2 ]; then
    W=$(( GPUS < 4 ? GPUS : 4 )); BACKEND=nccl; PIPE_W=$W
else
    W=2; BACKEND=gloo; PIPE_W=1
fi
{
step machine
echo "cores: $(nproc --all) online, $($PY -c "import os; print(len(os.sched_getaffinity(0)))") usable"
nvidia-smi -L; uptime
$PY -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), torch.cuda.device_count(), 'nccl', d.is_nccl_available())"
echo "runs: $W rank(s) over $BACKEND (gpipe: $PIPE_W rank(s))"
if [ "$GPUS" -lt 1 ]; then echo "no GPU: nothing to check here"; exit 1; fi

step tests/test_cuda.py
check timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py

for algo in bp dgl gpipe; do
    w=$W; [ "$algo" = gpipe ] && w=$PIPE_W
    step "bpsim run $algo --workers $w --device cuda"
    check timeout 45 $PY -m bpsim run "$algo" --workers "$w" --blocks "$W" --device cuda \
        --steps 40 --threads 1 --width 512 --batch-size 128 --no-eval \
        --trace "$OUT/runs/$algo.json" --json > "$OUT/runs/$algo.summary.json"
    head -c 400 "$OUT/runs/$algo.summary.json"; echo
done

step "waits are wait spans"
check timeout 20 $PY - "$OUT/runs" "$BACKEND" <<'EOF'
import sys
from pathlib import Path
from bpsim.trace import Trace

folder, backend = Path(sys.argv[1]), sys.argv[2]
bad = []
for algo in ("bp", "dgl", "gpipe"):
    path = folder / f"{algo}.json"
    if not path.exists():
        bad.append(f"{algo}: no trace"); continue
    t = Trace.load(path).check()
    ranks = sorted({r[0] for r in t.rows})
    wait = {k: sum(r[7] - r[6] for r in t.rows if r[0] == k and r[2] == "wait") for k in ranks}
    busy = {k: sum(r[7] - r[6] for r in t.rows if r[0] == k and r[1] == "compute"
                   and r[2] != "wait") for k in ranks}
    print(f"{algo}: backend {t.meta.get('backend')}, ranks {ranks}, "
          + ", ".join(f"rank {k} busy {busy[k]:.3f} s wait {wait[k]:.3f} s" for k in ranks))
    if len(ranks) < 2:
        continue                            # one rank: nothing to wait for
    if t.meta.get("backend") != backend:
        bad.append(f"{algo}: backend {t.meta.get('backend')}, expected {backend}")
    for k in ranks[1:]:
        if wait[k] <= 0:
            bad.append(f"{algo}: rank {k} has no wait span")
    if algo == "bp" and wait[0] < 0.5 * busy[1]:
        bad.append(f"bp: rank 0 waited {wait[0]:.3f} s while rank 1 computed {busy[1]:.3f} s: "
                   "the wait for the gradient is not drawn as a wait span")
print("\n".join(bad) or "ok: every wait is a wait span")
sys.exit(1 if bad else 0)
EOF

step "torchrun, $W rank(s) over $BACKEND"
check timeout 60 $PY -m torch.distributed.run --standalone --nproc-per-node "$W" -m bpsim run \
    dgl --workers "$W" --steps 30 --device cuda --threads 1 --no-eval

step throughput --device cuda --quick
check timeout 75 $PY benchmarks/throughput.py --quick --device cuda --out "$OUT/cuda"

if [ "${FULL:-0}" = 1 ]; then
    step fidelity --device cuda, 1 repeat
    check timeout 150 $PY benchmarks/fidelity.py --repeats 1 --device cuda --out "$OUT/cuda"
    step fidelity on the CPU cores, 3 repeats
    check timeout 330 $PY benchmarks/fidelity.py --repeats 3 --out "$OUT/cpu"
fi
step "done (failed: $FAILED)"
exit $FAILED
} 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
