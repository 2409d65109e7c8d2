#!/usr/bin/env bash
# The main job end to end on the embedded default data (called by `make demo`):
# simulate a CaloChallenge dataset-1-photons-like reference sample with the built-in GFLASH
# simulator, draw it, and evaluate it against an independent sample (the evaluation's
# "Geant4 vs Geant4" baseline: AUC ~ 0.5). Sizes: DEMO_N showers per sample.
set -euo pipefail
CALOFORGE=${CALOFORGE:-caloforge}
DEMO_DIR=${DEMO_DIR:-demo-output}
DEMO_N=${DEMO_N:-30000}
GEOMETRY=calochallenge-1-photons
mkdir -p "$DEMO_DIR"

echo "== geometries"
$CALOFORGE geometries

echo "== simulate: reference (seed 1) and an independent sample (seed 2), $DEMO_N showers each"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_N" --seed 1 -o "$DEMO_DIR/reference.h5"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_N" --seed 2 -o "$DEMO_DIR/independent.h5"

echo "== inspect and plot"
$CALOFORGE inspect "$DEMO_DIR/reference.h5" --geometry $GEOMETRY
$CALOFORGE plot "$DEMO_DIR/reference.h5" --geometry $GEOMETRY -o "$DEMO_DIR/reference.png"

echo "== evaluate: independent sample vs reference"
$CALOFORGE evaluate --reference "$DEMO_DIR/reference.h5" --generated "$DEMO_DIR/independent.h5" \
    --geometry $GEOMETRY -o "$DEMO_DIR/report-independent" --seed 0

echo
echo "Done. Open $DEMO_DIR/report-independent/report.html and $DEMO_DIR/reference.png"
