#!/usr/bin/env bash
# The long-budget `domain` protocol on a lent GPU, as one prepared command (not a test).
#
# CAST's gain can only show where more labelled data helps the student at all: >= 1000 student
# steps on this protocol (BENCHMARKS.md, "Is the student data-bound?"), about 4.5 h of a CPU core
# per seed and arm. Here: per seed (one process each, side by side on the one GPU), in order of
# what matters most, so a run cut short still returns the first ones:
#   noadapt_clean  distil 900 + refine 100 from θ_T⁰ with the pseudo-labels cleaned
#                  (dsb_protocol.CLEAN), and supervised-only 1000 from the same θ_s⁰
#   noadapt  the same, uncleaned
#   table1_clean   all of CAST (stage 1 as in the demo), cleaned, same budget
#   fraction5_clean   the same at 5 % labels (5 labeled images), with its own supervised-only
#   table1   all of CAST, uncleaned
#   oracle   supervised-only on all 91 train images' own labels, 1000 steps
#
# Here, once:   tools/gpu_wheels.sh      (what the device image lacks, into the ignored .whl/)
# Device run:   command "bash benchmarks/gpu_long_budget.sh", carry [".whl"], timeout_s 560
# Dry run here: DEVICE=cpu DISTILL=2 REFINE=1 SUPERVISED=3 VARIANTS=oracle SEEDS=0 \
#                   OUT=/tmp/gpu_out RUNS=/tmp/gpu_runs bash benchmarks/gpu_long_budget.sh
# Back in $OUT: tables.md (--render), runs.tar.gz (metrics, val curves, logs; no weights), one
# log per seed and env.txt. Unpack under runs/ and render with
#   python benchmarks/dsb_protocol.py --render --out runs/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out} RUNS=${RUNS:-runs/gpu} DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-0 1 2} VARIANTS=${VARIANTS:-noadapt_clean noadapt table1_clean fraction5_clean table1 oracle}
DISTILL=${DISTILL:-900} REFINE=${REFINE:-100} SUPERVISED=${SUPERVISED:-1000}
BUDGET_S=${BUDGET_S:-480}  # the runs' share of the command's limit: rendering and packing follow
mkdir -p "$OUT" "$RUNS"
PY=${PY:-python3}
if ! "$PY" -c "import faster_coco_eval, pydantic" 2>/dev/null; then  # the device image: from tools/gpu_wheels.sh
    compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_long_budget: no .whl/ (run tools/gpu_wheels.sh, carry .whl)" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_long_budget: installing .whl failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
{ date -u; "$PY" -c "import torch, castseg; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"; nproc; } > "$OUT/env.txt" 2>&1 \
    || { cat "$OUT/env.txt" >&2; exit 1; }
cat "$OUT/env.txt"
sets=(train.device="$DEVICE" train.val_every=100 distill.train.max_steps="$DISTILL"
      refine.train.max_steps="$REFINE" supervised.train.max_steps="$SUPERVISED")
pids=()
for s in $SEEDS; do
    # shellcheck disable=SC2086  # VARIANTS is a list
    OMP_NUM_THREADS=4 timeout "$BUDGET_S" "$PY" benchmarks/dsb_protocol.py --out "$RUNS" --protocol domain \
        --variants $VARIANTS --seeds "$s" --set "${sets[@]}" > "$OUT/seed$s.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "gpu_long_budget: a seed's run ended with $? (124: cut at ${BUDGET_S}s)"; done
"$PY" benchmarks/dsb_protocol.py --render --out "$RUNS" > "$OUT/tables.md" 2>&1
cat "$OUT/tables.md"
# metrics, validation curves, step logs and configs: small; checkpoints and caches stay behind
tar czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=tensorboard --exclude=pseudo_labels --exclude=splits "$RUNS"
ls -la "$OUT"
