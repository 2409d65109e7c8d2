#!/usr/bin/env bash
# The issue-28 GPU lease 4: iCaloFlow's CPU default (`cpu` preset, the README's
# time-to-fidelity recipe) on calochallenge-2 trained on a lent GPU, teacher then students
# from its weights, so the students can be generated from and evaluated on a CPU afterwards
# (reference simulator, not Geant4). The student's files come back in 15 MiB pieces
# (OUT/student.tar.part-*; `cat student.tar.part-* | tar -xf - -C S` rebuilds the run), the
# logs and step times in OUT/logs.tgz after every step. Usage (the device machine):
#   bash scripts/gpu-icaloflow-cpu-calochallenge2.sh OUT_DIR [TRAIN_BUDGET] \
#        [DISTILL_BUDGET] [DEADLINE_SECONDS] [N_TRAIN] [PRESET] [DEVICE]
# e.g. on the device: bash scripts/gpu-icaloflow-cpu-calochallenge2.sh $OUT 200s 80s 560
# and a dry run on a CPU: bash scripts/gpu-icaloflow-cpu-calochallenge2.sh /tmp/o 10s 5s 400 300 tiny cpu
# Needs caloforge importable (PYTHONPATH=src) and, for DEVICE=cuda, a CUDA torch.
set -uo pipefail
ship=${1:?output folder}; train_budget=${2:-200s}; distill_budget=${3:-80s}
deadline=$(( $(date +%s) + ${4:-560} )); n_train=${5:-100000}; preset=${6:-cpu}
device=${7:-cuda}
out=/tmp/icf-gpu-logs; work=/tmp/icf-gpu
export PACK=$ship/logs.tgz
source "$(dirname "$0")/device-steps.sh"
mkdir -p "$ship"
step simulate-train 120 simulate --geometry calochallenge-2 -n "$n_train" --seed 11 \
    -o "$work/train.h5" --workers 14 || exit 1
step train 900 train icaloflow --data "$work/train.h5" --geometry calochallenge-2 \
    --preset "$preset" --device "$device" --time-budget "$train_budget" -o "$work/run" \
    || exit 1
cp "$work/run/train_log.jsonl" "$out/teacher_log.jsonl"
step distill 900 distill "$work/run" -o "$work/student" --device "$device" \
    --time-budget "$distill_budget" || exit 1
cp "$work/student/train_log.jsonl" "$out/student_log.jsonl" 2>/dev/null
tar -czf "$PACK" -C "$out" .
tar -cf - -C "$work/student" $(cd "$work/student" && ls | grep -v '^checkpoint') \
    | split -b 15M - "$ship/student.tar.part-"
ls -la "$ship"; cat "$steps"
