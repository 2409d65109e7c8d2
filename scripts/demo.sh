#!/usr/bin/env bash
# The main job end to end on the embedded default data (called by `make demo`).
set -euo pipefail
CALOFORGE=${CALOFORGE:-caloforge}
DEMO_DIR=${DEMO_DIR:-demo-output}
mkdir -p "$DEMO_DIR"
$CALOFORGE geometries
