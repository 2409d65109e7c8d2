#!/usr/bin/env bash
# The G4HepEm electron showers that caloforge measures on (real Geant4 EM physics, see
# docs/real-physics.md): one split at a time, with fixed seeds, into OUT_DIR/<split>.h5.
#
# usage: bench/hepemshow/make_data.sh SPLIT OUT_DIR [HEPEMSHOW_GIT G4HEPEM_GIT]
#   SPLIT    train (20,000: seeds 1-2), val (10,000: seed 201), test (20,000: seeds 101-102),
#            tune (3,000: seed 301; for fitting the reference simulator), smoke (200: seed 999)
#   OUT_DIR  where <split>.h5 goes (the build and the per-seed files go to OUT_DIR/raw)
#   *_GIT    git directories of github.com/mnovak42/hepemshow and github.com/mnovak42/g4hepem
#            (default: the mirrors the tool library's `fetch` makes under /work/.mirror)
# env: SHARED (default ../shared beside the checkout), CALOFORGE, PYTHON (default .venv/bin/*).
# Cost: ~81 ms of CPU per shower (log-uniform 1-100 GeV); each seed runs as its own process,
# so a split with k seeds uses k cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SPLIT=${1:?split: train, val, test, tune or smoke}; OUT=${2:?output folder}
HGIT=${3:-/work/.mirror/mnovak42+hepemshow/repo}; GGIT=${4:-/work/.mirror/mnovak42+g4hepem/repo}
SHARED=${SHARED:-$ROOT/../shared}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; CALOFORGE=${CALOFORGE:-$ROOT/.venv/bin/caloforge}
case "$SPLIT" in
  train) SEEDS="1 2"; N=10000 ;;
  val)   SEEDS="201"; N=10000 ;;
  test)  SEEDS="101 102"; N=10000 ;;
  tune)  SEEDS="301"; N=3000 ;;
  smoke) SEEDS="999"; N=200 ;;
  *) echo "make_data.sh: unknown split '$SPLIT' (train, val, test, tune, smoke)" >&2; exit 2 ;;
esac
mkdir -p "$OUT/raw"
SEEDS="$SEEDS" N=$N EMIN=1000 EMAX=100000 PYTHON="$PYTHON" WORK="$OUT/raw/work" \
  bash "$SHARED/hepemshow/make_dataset.sh" "$HGIT" "$GGIT" "$OUT/raw"
files=()
for s in $SEEDS; do files+=("$OUT/raw/hepemshow_electrons_logE_1000-100000MeV_seed$s.h5"); done
"$CALOFORGE" merge-showers --geometry hepemshow-pbwo4-lar -o "$OUT/$SPLIT.h5" "${files[@]}"
echo "wrote $OUT/$SPLIT.h5"
