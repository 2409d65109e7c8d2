#!/usr/bin/env bash
# The issue-28 GPU check for calochallenge-3: does what moved the calochallenge-2 student
# (hit counts drawn per layer, core-fraction rings; docs/icaloflow.md) move the
# calochallenge-3 low-level AUC (0.999 on the 2 CPU cores)? iCaloFlow's CPU default
# (`cpu` preset) trained on the GPU, students from its weights, then the SAME student
# evaluated twice: as distilled, and re-saved with `hit_counts: layer` + `core_fraction:
# rings` (bench/recalibrate_icaloflow.py, fitted on the device's CPUs while the GPU
# generates and evaluates the first). Reference simulator, not Geant4. The model (hundreds
# of MB) stays there; the reports come back in OUT/logs.tgz (packed after every step).
# Usage (the device machine):
#   bash scripts/gpu-icaloflow-calochallenge3.sh OUT_DIR [TRAIN_BUDGET] [DISTILL_BUDGET] \
#        [DEADLINE_SECONDS] [N_TRAIN] [PRESET] [DEVICE] [N_HELDOUT] [GEOMETRY]
# e.g. on the device: bash scripts/gpu-icaloflow-calochallenge3.sh $OUT 170s 50s 565
# and a dry run on a CPU:
#   THREADS=1 bash scripts/gpu-icaloflow-calochallenge3.sh /tmp/o 10s 5s 900 300 tiny cpu 200
# Needs caloforge importable (PYTHONPATH=src) and, for DEVICE=cuda, a CUDA torch.
set -uo pipefail
out=${1:?output folder}; train_budget=${2:-170s}; distill_budget=${3:-50s}
deadline=$(( $(date +%s) + ${4:-565} )); n_train=${5:-20000}; preset=${6:-cpu}
device=${7:-cuda}; n_heldout=${8:-3000}; geometry=${9:-calochallenge-3}
threads=${THREADS:-12}
work=/tmp/icf3-gpu
export PACK=$out/logs.tgz
log_dir=/tmp/icf3-gpu-logs
ship=$out; out=$log_dir  # step() writes its logs to $out; only the archive goes back
source "$(dirname "$0")/device-steps.sh"
mkdir -p "$ship"
step simulate-train 150 simulate --geometry "$geometry" -n "$n_train" --seed 21 \
    -o "$work/train.h5" --workers 14 &
step simulate-heldout 150 simulate --geometry "$geometry" -n "$n_heldout" --seed 12 \
    -o "$work/heldout.h5" --workers 2 &
wait
[[ -f $work/train.h5 && -f $work/heldout.h5 ]] || exit 1
step train 900 train icaloflow --data "$work/train.h5" --geometry "$geometry" \
    --preset "$preset" --device "$device" --time-budget "$train_budget" \
    --threads "$threads" -o "$work/teacher" || exit 1
cp "$work/teacher/train_log.jsonl" "$out/teacher_log.jsonl"
step distill 900 distill "$work/teacher" -o "$work/student" --device "$device" \
    --threads "$threads" --time-budget "$distill_budget" || exit 1
cp "$work/student/train_log.jsonl" "$out/student_log.jsonl" 2>/dev/null
# judge NAME RUN: generate like the held-out file, evaluate (fast classifier), core shares
judge() {
    local name=$1 run=$2
    step "generate-$name" 150 generate "$run" --like "$work/heldout.h5" -n "$n_heldout" \
        --seed 1 --device "$device" --threads 4 -o "$work/gen-$name.h5" || return 1
    step "evaluate-$name" 200 evaluate --reference "$work/heldout.h5" \
        --generated "$work/gen-$name.h5" --geometry "$geometry" \
        --metrics hist,cls-low,cls-high --max-showers "$n_heldout" --classifier-preset fast --no-plots \
        --threads 4 --device "$device" -o "$work/rep-$name"
    cp "$work/rep-$name/metrics.json" "$out/$name.metrics.json" 2>/dev/null
    timeout $(( $(left) > 8 ? $(left) - 3 : 5 )) python3 bench/check_core_fraction.py \
        "$work/gen-$name.h5" --reference "$work/heldout.h5" --geometry "$geometry" \
        > "$out/$name.core.json" 2> "$out/$name.core.log"
    tar -czf "$PACK" -C "$out" .
}
recalibrate() {
    local started; started=$(date +%s)
    timeout $(( $(left) - 5 )) python3 bench/recalibrate_icaloflow.py "$work/student" \
        --train "$work/train.h5" --hit-counts layer --core-fraction rings \
        --threads "$threads" -o "$work/student-LR" > "$out/recalibrate.log" 2>&1
    local status=$?
    printf 'recalibrate\t%s\t%s\n' $(( $(date +%s) - started )) "$status" | tee -a "$steps"
}
judge student "$work/student" & recalibrate; wait
judge student-LR "$work/student-LR"
cat "$steps"
tar -czf "$PACK" -C "$out" .
ls -la "$ship"
