#!/usr/bin/env bash
# The issue-28 GPU check: iCaloFlow's `paper` preset on calochallenge-2 (reference
# simulator, not Geant4), time-budgeted to fit one short GPU lease: teacher, students
# distilled on the GPU, generation, the official classifier (3 x 2048, 3 repeats) and the
# sampling speed, all on the GPU. Every step's result lands in OUT_DIR as it finishes, so a
# lease that ends early still leaves what was measured. Usage (the device machine):
#   bash scripts/gpu-paper-calochallenge2.sh OUT_DIR [TRAIN_BUDGET] [DISTILL_BUDGET] \
#        [DEADLINE_SECONDS] [N_TRAIN] [N_HELDOUT] [PRESET] [DEVICE]
# e.g. on the device: bash scripts/gpu-paper-calochallenge2.sh $OUT 140s 60s 550
# and a dry run on a CPU: bash scripts/gpu-paper-calochallenge2.sh /tmp/o 20s 10s 400 \
#        3000 100000 tiny cpu
# PACK=FILE.tgz packs OUT_DIR after each step. Needs caloforge importable (PYTHONPATH=src) and, for DEVICE=cuda, a CUDA torch.
set -uo pipefail
out=${1:?output folder}; train_budget=${2:-140s}; distill_budget=${3:-60s}
deadline=$(( $(date +%s) + ${4:-540} )); n_train=${5:-100000}; n_heldout=${6:-100000}
preset=${7:-paper}; device=${8:-cuda}
work=/tmp/cc2-gpu
source "$(dirname "$0")/device-steps.sh"
step simulate-train 120 simulate --geometry calochallenge-2 -n "$n_train" --seed 11 \
    -o "$work/train.h5" --workers 9 &
step simulate-heldout 120 simulate --geometry calochallenge-2 -n "$n_heldout" --seed 12 \
    -o "$work/heldout.h5" --workers 6 &
wait
step train 600 train icaloflow --data "$work/train.h5" --geometry calochallenge-2 \
    --preset "$preset" --device "$device" --time-budget "$train_budget" -o "$work/run" \
    || exit 1
cp "$work/run/train_log.jsonl" "$out/teacher_log.jsonl"
step distill 600 distill "$work/run" -o "$work/student" --device "$device" \
    --time-budget "$distill_budget" || exit 1
cp "$work/student/train_log.jsonl" "$out/student_log.jsonl" 2>/dev/null
step generate-student 120 generate "$work/student" --like "$work/heldout.h5" \
    -o "$work/gen.h5" --device "$device" --seed 1 || exit 1
# the official split of dataset 2 takes 100,000 showers of each file (60k/20k/20k)
step evaluate-official 150 evaluate --reference "$work/heldout.h5" \
    --generated "$work/gen.h5" --geometry calochallenge-2 --classifier-preset official \
    --metrics cls-low,cls-high --repeats 3 --device "$device" -o "$work/report"
cp "$work/report/metrics.json" "$out/metrics_official.json" 2>/dev/null
# the issue's protocol: 20,000 held-out showers, fast classifier, 3 repeats
step evaluate-fast 90 evaluate --reference "$work/heldout.h5" --generated "$work/gen.h5" \
    --geometry calochallenge-2 --classifier-preset fast --metrics hist,cls-low,cls-high \
    --repeats 3 --max-showers 20000 --device "$device" -o "$work/report-fast"
cp "$work/report-fast/metrics.json" "$out/metrics_fast.json" 2>/dev/null
step bench-student 45 bench-sampling "$work/student" --device "$device" --threads 1 \
    --batch-sizes 10000 --repeats 3 --max-seconds 15 --like "$work/heldout.h5" \
    -o "$out/student_sampling.json"
step bench-teacher 45 bench-sampling "$work/run" --device "$device" --threads 1 \
    --batch-sizes 1000 --repeats 1 --max-seconds 20 --like "$work/heldout.h5" \
    -o "$out/teacher_sampling.json"
cat "$steps"
