#!/usr/bin/env bash
# The issue-28 GPU check for ild-ecal: where more compute takes the CPU-default convolutional
# flow (`cpu` preset, the README's time-to-fidelity recipe: hit calibration, deposited layer
# energies), and whether per-cell standardisation (`cell_scale: cell`) narrows the split of
# the 2x2 core. Two runs side by side on one GPU, same data (reference simulator, not
# Geant4): A the recipe, B the recipe + cell_scale: cell. Each run's model files come back
# in 15 MiB pieces (OUT/NAME.model.part-*) so they can be generated from and evaluated on a
# CPU afterwards; then each is generated (3,000 showers like HELDOUT) and evaluated on the
# GPU while time is left. Usage (the device machine):
#   bash scripts/gpu-ild-convflow.sh OUT_DIR [TRAIN_BUDGET] [DEADLINE_SECONDS] [HELDOUT] \
#        [N_TRAIN] [DEVICE] [N_GENERATED]
# e.g. on the device: bash scripts/gpu-ild-convflow.sh $OUT 300s 560 bench-output/ild/test.h5
# and a dry run on a CPU: THREADS=1 bash scripts/gpu-ild-convflow.sh /tmp/o 10s 400 HELD.h5 300 cpu 300
# Needs caloforge importable (PYTHONPATH=src) and, for DEVICE=cuda, a CUDA torch.
set -uo pipefail
out=${1:?output folder}; train_budget=${2:-300s}; deadline=$(( $(date +%s) + ${3:-560} ))
heldout=${4:-}; n_train=${5:-20000}; device=${6:-cuda}; n_gen=${7:-3000}
threads=${THREADS:-4}  # per run; the two runs go side by side
work=/tmp/ild-gpu
source "$(dirname "$0")/device-steps.sh"
printf 'noise_mev: 0.0675\nhit_calibration_showers: 1000\nhit_calibration_groups: hit-rate\nlayer_energy: deposited\n' \
    > "$work/A.yaml"
{ cat "$work/A.yaml"; echo 'cell_scale: cell'; } > "$work/B.yaml"
step simulate-train 150 simulate --geometry ild-ecal -n "$n_train" --seed 11 \
    -o "$work/train.h5" --workers 14 &
if [[ -z $heldout ]]; then
    heldout=$work/heldout.h5
    step simulate-heldout 150 simulate --geometry ild-ecal -n "$n_gen" --seed 12 -o "$heldout" \
        --workers 2 &
fi
wait
# run NAME: train, ship the model, generate, evaluate, the core split
run() {
    local name=$1 dir=$work/$1
    step "train-$name" 900 train convflow --data "$work/train.h5" --geometry ild-ecal \
        --config "$work/$name.yaml" --device "$device" --time-budget "$train_budget" \
        --threads "$threads" -o "$dir" || return 1
    cp "$dir/train_log.jsonl" "$out/$name.train_log.jsonl"
    gzip -c "$dir/model.json" > "$out/$name.model.json.gz"
    tar -cf - -C "$dir" $(cd "$dir" && ls model-*.safetensors) | split -b 15M - "$out/$name.model.part-"
    step "generate-$name" 120 generate "$dir" --like "$heldout" -n "$n_gen" --seed 1 \
        --device "$device" --threads "$threads" -o "$work/gen-$name.h5" || return 1
    step "evaluate-$name" 300 evaluate --reference "$heldout" --generated "$work/gen-$name.h5" \
        --geometry ild-ecal --metrics hist,cls-low,cls-high --max-showers "$n_gen" \
        --classifier-preset fast --threads "$threads" \
        --device "$device" -o "$work/rep-$name"
    cp "$work/rep-$name/metrics.json" "$out/$name.metrics.json" 2>/dev/null
    timeout $(( $(left) - 3 )) python3 bench/check_ild_cores.py "$work/gen-$name.h5" \
        --reference "$heldout" --n "$n_gen" > "$out/$name.cores.json" 2> "$out/$name.cores.log"
}
run A & run B & wait
cat "$steps"
tar -czf "$work/logs.tgz" -C "$out" --exclude='*.model.part-*' . && mv "$work/logs.tgz" "$out/" && \
    find "$out" -maxdepth 1 -type f ! -name 'logs.tgz' ! -name '*.model.part-*' -delete
