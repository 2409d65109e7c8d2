#!/usr/bin/env bash
# The families that suit 8,000 cylindrical voxels trained on G4HepEm showers and evaluated
# on 20,000 held-out G4HepEm showers (time-to-fidelity lines, fast classifier, 1 thread each),
# the after-training recipes off (the `cpu` default) and on:
#   icaloflow   cpu preset                         -> "icaloflow / hepemshow-pbwo4-lar"
#   convflow    the calochallenge-3 recipe          -> "... (cc3 recipe)"
#   icaloflow-recipe  the icaloflow run re-fitted with the calochallenge-2 student's after-
#               training steps (hit_counts: layer, core_fraction: rings) -> "... (cc2 recipe)"
# usage: bench/hepemshow/families.sh DATA_DIR STAGES [icaloflow|convflow ...]
#   DATA_DIR with train.h5 and test.h5 (bench/hepemshow/make_data.sh); STAGES e.g. 30 or
#   30,60,120 (training minutes; a later call with more stages resumes the runs).
# Runs go to bench-output/hepemshow/, figures to bench/hepemshow/results/time-to-fidelity.json
# as each stage finishes. Calo GAN and WGAN need Cartesian layers; CaloFlow is for <~1000 voxels.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); cd "$ROOT"
DATA=$(readlink -f "${1:?data folder}"); STAGES=${2:?stages, e.g. 30}; shift 2
FAMILIES=${*:-icaloflow convflow}
PY=${PYTHON:-.venv/bin/python}
common=(--geometry hepemshow-pbwo4-lar --train "$DATA/train.h5" --test "$DATA/test.h5"
        --stages "$STAGES" --threads 1 --n-eval 20000
        --results bench/hepemshow/results/time-to-fidelity.json
        --plot-file bench/hepemshow/results/time-to-fidelity.png
        --ground "G4HepEm showers (Geant4 EM physics)")
for family in $FAMILIES; do
  case "$family" in
    icaloflow) "$PY" bench/time_to_fidelity.py --family icaloflow "${common[@]}" \
                 --work bench-output/hepemshow/icaloflow ;;
    convflow)  "$PY" bench/time_to_fidelity.py --family convflow "${common[@]}" \
                 --config bench/hepemshow/convflow-recipe.yaml --tag "cc3 recipe" \
                 --work bench-output/hepemshow/convflow-recipe ;;
    icaloflow-recipe)
      "$PY" bench/recalibrate_icaloflow.py bench-output/hepemshow/icaloflow/run \
        --train "$DATA/train.h5" --hit-counts layer --core-fraction rings \
        -o bench-output/hepemshow/icaloflow/run-cc2-recipe
      "$PY" bench/time_to_fidelity.py --family icaloflow "${common[@]}" --tag "cc2 recipe" \
        --run bench-output/hepemshow/icaloflow/run-cc2-recipe \
        --work bench-output/hepemshow/icaloflow-recipe \
        --note "the ${STAGES}-min icaloflow run re-fitted after training" ;;
    *) echo "families.sh: unknown family $family" >&2; exit 2 ;;
  esac
done
