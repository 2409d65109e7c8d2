#!/usr/bin/env bash
# The issue-28 GPU check: iCaloFlow's `paper` preset on calochallenge-2 (reference
# simulator, not Geant4), time-budgeted to fit one short GPU lease, evaluated with the
# official classifier (3 x 2048, 3 repeats) on the GPU. Usage (the device machine):
#   bash scripts/gpu-paper-calochallenge2.sh OUT_DIR [TRAIN_BUDGET]
# Needs caloforge importable (PYTHONPATH=src) and a CUDA torch.
set -euo pipefail
out=${1:?output folder}; budget=${2:-4m}
work=/tmp/cc2; mkdir -p "$work" "$out"
cf() { python3 -m caloforge "$@" --no-progress; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cf simulate --geometry calochallenge-2 -n 100000 --seed 11 -o "$work/train.h5" --workers 14
cf simulate --geometry calochallenge-2 -n 20000 --seed 12 -o "$work/heldout.h5" --workers 14
cf train icaloflow --data "$work/train.h5" --geometry calochallenge-2 --preset paper \
   --device cuda --time-budget "$budget" -o "$work/run" 2>&1 | tail -3
cp "$work/run/train_log.jsonl" "$out/"
started=$(date +%s)
cf generate "$work/run" --like "$work/heldout.h5" -o "$work/gen.h5" --device cuda --seed 1
echo "generate_seconds_20000_showers $(( $(date +%s) - started ))" | tee "$out/generate.txt"
cf evaluate --reference "$work/heldout.h5" --generated "$work/gen.h5" \
   --geometry calochallenge-2 --classifier-preset official --repeats 3 --device cuda \
   -o "$work/report" 2>&1 | tail -8
cp "$work/report/metrics.json" "$out/"
python3 -c "import json; print(json.load(open('$work/run/model.json'))['training'])" \
   | tee "$out/training.txt"
