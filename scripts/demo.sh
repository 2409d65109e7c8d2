#!/usr/bin/env bash
# The main job end to end on the embedded default data (called by `make demo`):
#   1. simulate a CaloChallenge-dataset-1-photons-like training set and an independent
#      held-out reference with the built-in GFLASH reference simulator;
#   2. train the CaloFlow teacher (CPU preset) within a time budget;
#   3. distil it into an IAF student (CaloFlow II) within a time budget;
#   4. generate as many showers as the held-out reference, with its incident energies, with
#      the teacher and with the student;
#   5. evaluate both against the held-out reference, and (baseline) a second simulated sample;
#   6. time sampling of both, and print teacher vs student side by side.
# Sizes: DEMO_TRAIN (60000), DEMO_TEST (10000) showers; DEMO_BUDGET (15m) of teacher training,
# DISTILL_BUDGET (10m) of distillation. About 40 minutes on 2 CPU cores.
# `make demo-quick` runs the same pipeline small (a few minutes).
set -euo pipefail
CALOFORGE=${CALOFORGE:-caloforge}
DEMO_DIR=${DEMO_DIR:-demo-output}
DEMO_TRAIN=${DEMO_TRAIN:-60000}
DEMO_TEST=${DEMO_TEST:-10000}
DEMO_BUDGET=${DEMO_BUDGET:-15m}
DISTILL_BUDGET=${DISTILL_BUDGET:-10m}
BENCH_BATCHES=${BENCH_BATCHES:-1,100,1000}
PYTHON=${PYTHON:-python3}
GEOMETRY=calochallenge-1-photons
mkdir -p "$DEMO_DIR"

echo "== 1. simulate: $DEMO_TRAIN training and $DEMO_TEST held-out showers ($GEOMETRY)"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TRAIN" --seed 1 -o "$DEMO_DIR/train.h5"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TEST" --seed 2 -o "$DEMO_DIR/heldout.h5"
$CALOFORGE simulate --geometry $GEOMETRY -n "$DEMO_TEST" --seed 3 -o "$DEMO_DIR/independent.h5"
$CALOFORGE inspect "$DEMO_DIR/train.h5" --geometry $GEOMETRY
$CALOFORGE plot "$DEMO_DIR/heldout.h5" --geometry $GEOMETRY -o "$DEMO_DIR/heldout.png"

echo "== 2. train the CaloFlow teacher for at most $DEMO_BUDGET"
rm -rf "$DEMO_DIR/caloflow" "$DEMO_DIR/student"
$CALOFORGE train caloflow --data "$DEMO_DIR/train.h5" --geometry $GEOMETRY \
    -o "$DEMO_DIR/caloflow" --time-budget "$DEMO_BUDGET" --seed 0

echo "== 3. distil the teacher into a one-pass IAF student for at most $DISTILL_BUDGET"
$CALOFORGE distill "$DEMO_DIR/caloflow" -o "$DEMO_DIR/student" --time-budget "$DISTILL_BUDGET"

echo "== 4. generate $DEMO_TEST showers with the held-out incident energies"
for model in caloflow student; do
    $CALOFORGE generate "$DEMO_DIR/$model" --like "$DEMO_DIR/heldout.h5" \
        -o "$DEMO_DIR/generated-$model.h5" --seed 1
    $CALOFORGE plot "$DEMO_DIR/generated-$model.h5" --geometry $GEOMETRY \
        -o "$DEMO_DIR/generated-$model.png"
done

echo "== 5. evaluate"
for model in caloflow student; do
    $CALOFORGE evaluate --reference "$DEMO_DIR/heldout.h5" \
        --generated "$DEMO_DIR/generated-$model.h5" --geometry $GEOMETRY \
        -o "$DEMO_DIR/report-$model"
done
echo "-- baseline: an independent simulated sample against the same held-out reference"
$CALOFORGE evaluate --reference "$DEMO_DIR/heldout.h5" --generated "$DEMO_DIR/independent.h5" \
    --geometry $GEOMETRY -o "$DEMO_DIR/report-baseline" --metrics hist,cls-low,cls-high

echo "== 6. sampling cost on 1 thread (the teacher at batch 10,000 would take ~10 minutes)"
$CALOFORGE bench-sampling "$DEMO_DIR/caloflow" --threads 1 --batch-sizes "$BENCH_BATCHES"
$CALOFORGE bench-sampling "$DEMO_DIR/student" --threads 1 --batch-sizes "$BENCH_BATCHES"

echo
$PYTHON - "$DEMO_DIR" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'':10}{'AUC low':>10}{'AUC high':>10}{'FPD x1e3':>10}   ms/shower on 1 thread")
for name in ("caloflow", "student", "baseline"):
    metrics = json.load(open(f"{out}/report-{name}/metrics.json"))
    fpd = metrics["fpd_x1e3"]["value"] if "fpd_x1e3" in metrics else None
    line = (f"{name:10}{metrics['cls-low']['auc_mean']:>10.3f}"
            f"{metrics['cls-high']['auc_mean']:>10.3f}"
            + (f"{fpd:>10.1f}" if fpd is not None else f"{'(not run)':>10}"))
    if name != "baseline":
        rows = json.load(open(f"{out}/{name}/sampling_benchmark.json"))["results"]
        line += "   " + ", ".join(f"{r['ms_per_shower']:.2f} (batch {r['batch_size']})"
                                  for r in rows)
    print(line)
PY
echo
echo "Done. Teacher report: $DEMO_DIR/report-caloflow/report.html"
echo "      student report: $DEMO_DIR/report-student/report.html"
echo "      baseline report: $DEMO_DIR/report-baseline/report.html"
echo "      loss curves:    $DEMO_DIR/caloflow/loss_curve.png, $DEMO_DIR/student/loss_curve.png"
