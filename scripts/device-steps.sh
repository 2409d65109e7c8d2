# Shared by the GPU-lease scripts (scripts/gpu-*.sh), sourced after they set `out` (the
# output folder), `work` (a scratch folder, emptied here) and `deadline` (epoch seconds).
# Starts $out/steps.tsv and records the GPU and the torch / zuko versions in $out/gpu.txt.
rm -rf "$work"; mkdir -p "$work" "$out"
steps="$out/steps.tsv"; printf 'step\tseconds\texit\n' > "$steps"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, zuko; print('torch', torch.__version__, 'zuko', zuko.__version__)" \
    | tee -a "$out/gpu.txt"
# left: seconds to the deadline.
left() { echo $(( deadline - $(date +%s) )); }
# step NAME MAX_SECONDS ARGS...: runs `caloforge ARGS` under a timeout of min(MAX, time left - 5),
# records its wall time and exit status in $steps, and writes its output to $out/NAME.log.
# PACK=FILE.tgz: everything in $out in one archive after each step (a lease returns few files).
step() {
    local name=$1 cap=$2; shift 2
    local limit; limit=$(left); limit=$(( limit - 5 < cap ? limit - 5 : cap ))
    if (( limit < 5 )); then printf '%s\t0\tskipped (deadline)\n' "$name" >> "$steps"; return 1; fi
    local started; started=$(date +%s)
    timeout "$limit" python3 -m caloforge "$@" --no-progress > "$out/$name.log" 2>&1; local status=$?
    printf '%s\t%s\t%s\n' "$name" $(( $(date +%s) - started )) "$status" | tee -a "$steps"
    tail -4 "$out/$name.log"
    if [[ -n ${PACK:-} ]]; then tar -czf "$PACK" -C "$out" .; fi
    return "$status"
}
