#!/usr/bin/env bash
# The main job end to end on the embedded default data (called by `make demo`):
#   1. simulate a CaloChallenge-dataset-1-photons-like training set and an independent
#      held-out reference with the built-in GFLASH reference simulator;
#   2. train CaloFlow (CPU preset) within a time budget;
#   3. generate as many showers as the held-out reference, with its incident energies;
#   4. evaluate generated vs held-out, and (baseline) a second simulated sample vs held-out.
# Sizes: DEMO_TRAIN (60000), DEMO_TEST (20000) showers; DEMO_BUDGET (25m) of training.
# `make demo-quick` runs the same pipeline small (a few minutes).
set -euo pipefail
CALOFORGE=${CALOFORGE:-caloforge}
DEMO_DIR=${DEMO_DIR:-demo-output}
DEMO_TRAIN=${DEMO_TRAIN:-60000}
DEMO_TEST=${DEMO_TEST:-20000}
DEMO_BUDGET=${DEMO_BUDGET:-25m}
GEOMETRY=calochallenge-1-photons
mkdir -p "$DEMO_DIR"

echo "== 1. simulate: $DEMO_TRAIN training and $DEMO_TEST held-out showers ($GEOMETRY)"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TRAIN" --seed 1 -o "$DEMO_DIR/train.h5"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TEST" --seed 2 -o "$DEMO_DIR/heldout.h5"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TEST" --seed 3 -o "$DEMO_DIR/independent.h5"
$CALOFORGE inspect "$DEMO_DIR/train.h5" --geometry $GEOMETRY
$CALOFORGE plot "$DEMO_DIR/heldout.h5" --geometry $GEOMETRY -o "$DEMO_DIR/heldout.png"

echo "== 2. train CaloFlow for at most $DEMO_BUDGET"
rm -rf "$DEMO_DIR/caloflow"
$CALOFORGE train caloflow --data "$DEMO_DIR/train.h5" --geometry $GEOMETRY \
    -o "$DEMO_DIR/caloflow" --time-budget "$DEMO_BUDGET" --seed 0

echo "== 3. generate $DEMO_TEST showers with the held-out incident energies"
$CALOFORGE generate "$DEMO_DIR/caloflow" --like "$DEMO_DIR/heldout.h5" \
    -o "$DEMO_DIR/generated.h5" --seed 1
$CALOFORGE plot "$DEMO_DIR/generated.h5" --geometry $GEOMETRY -o "$DEMO_DIR/generated.png"

echo "== 4. evaluate"
$CALOFORGE evaluate --reference "$DEMO_DIR/heldout.h5" --generated "$DEMO_DIR/generated.h5" \
    --geometry $GEOMETRY -o "$DEMO_DIR/report"
echo "-- baseline: an independent simulated sample against the same held-out reference"
$CALOFORGE evaluate --reference "$DEMO_DIR/heldout.h5" --generated "$DEMO_DIR/independent.h5" \
    --geometry $GEOMETRY -o "$DEMO_DIR/report-baseline" --metrics hist,cls-low,cls-high

echo
echo "Done. CaloFlow report: $DEMO_DIR/report/report.html"
echo "      baseline report: $DEMO_DIR/report-baseline/report.html"
echo "      loss curve:      $DEMO_DIR/caloflow/loss_curve.png"
