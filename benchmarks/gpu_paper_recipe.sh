#!/usr/bin/env bash
# The paper's recipe at the paper's size on a lent GPU, as one prepared command (not a test):
# configs/cityscapes_10pct.yaml with random-initialised Grounding DINO-B, SAM2.1-L and DINOv2-S
# written to a hub cache, synthetic 1024x2048 images, STEPS steps of every stage, one process on
# one GPU (the lent machine's; torchrun is rehearsed on CPU in the suite). Per stage: s/step, images/s, the data
# loader's share, peak memory vs `castseg plan`; teacher vs student latency
# (benchmarks/gpu_paper_recipe.py says how each is measured).
#
# Here, once:   tools/gpu_wheels.sh      (what the device image lacks, into the ignored .whl/)
# Device run:   command "bash benchmarks/gpu_paper_recipe.sh", carry [".whl"], timeout_s 480
# Dry run (CPU, tiny models; the test suite does this):
#   SIZE=tiny IMAGE=64x128 CROP=64x128 STEPS=1 DEVICE=cpu OUT=/tmp/gpu_paper \
#   SETS="teacher.detector_size=[64,128] model.dec_layers=2 ..." bash benchmarks/gpu_paper_recipe.sh
# Back in $OUT: results.md / results.json (and env.txt, run.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_paper} SIZE=${SIZE:-paper} IMAGE=${IMAGE:-1024x2048} CROP=${CROP:-} STEPS=${STEPS:-3}
DEVICE=${DEVICE:-auto} BUDGET_S=${BUDGET_S:-420} SETS=${SETS:-} HUB_CACHE=${HUB_CACHE:-}
PY=${PY:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import faster_coco_eval, pydantic" 2>/dev/null; then  # the device image: from tools/gpu_wheels.sh
    compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_paper_recipe: no .whl/ (run tools/gpu_wheels.sh, carry .whl)" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_paper_recipe: installing .whl failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg \
    CASTSEG_NO_PROGRESS=1
{ date -u; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"; nproc; } > "$OUT/env.txt" 2>&1 \
    || { cat "$OUT/env.txt" >&2; exit 1; }
cat "$OUT/env.txt"
args=(--out "$OUT" --size "$SIZE" --image "$IMAGE" --steps "$STEPS" --device "$DEVICE")
[ -n "$CROP" ] && args+=(--crop "$CROP")
[ -n "$HUB_CACHE" ] && args+=(--hub-cache "$HUB_CACHE")  # an existing HF_HOME (the dry run's)
# shellcheck disable=SC2206  # SETS is a list of key=value overrides
[ -n "$SETS" ] && args+=(--set $SETS)
timeout "$BUDGET_S" "$PY" benchmarks/gpu_paper_recipe.py "${args[@]}" > "$OUT/run.log" 2>&1
rc=$?
tail -n 40 "$OUT/run.log"
[ $rc -eq 0 ] || { echo "gpu_paper_recipe: ended with $rc (124: cut at ${BUDGET_S}s)" >&2; exit $rc; }
rm -rf "$OUT/hf" "$OUT/run"/*/checkpoints "$OUT/run"/*/*/checkpoints "$OUT/data"  # weights: gigabytes, no value
ls -la "$OUT"
