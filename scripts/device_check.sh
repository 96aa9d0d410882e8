#!/usr/bin/env bash
# The GPU checks of issue 33, as one script for a lent GPU machine (docs/engine.md, "Running on
# a lent GPU"): run from the repository root, with the missing packages as wheels in .whl/.
#   1. the cuda tests (tests/test_cuda.py: GPU against CPU golden, `mlpim check` end to end,
#      the memory estimate against the peak allocated, device_map=auto);
#   2. `mlpim run experiment=ioi_mlp8_das` and `mlpim check` (cold, then with the references
#      cached) timed on random-weight models of SmolLM2-135M's and Gemma 3 270M's real shapes,
#      built from their configs (scripts/device_check.py; no GGUF file travels);
#   3. the DAS benchmark (`make bench`'s scripts/bench_das.py) on tiny models and on those shapes.
# Writes to $OUT: device.txt, log.txt, cuda_tests.xml, timings.jsonl, bench.csv. The steps run
# in that order of priority within DEADLINE seconds (default 420: the device tool's calls run at
# most 600 s, and a lease is 15 minutes with the machine's start); each has its own time limit,
# and one that would start with less than 20 s left is skipped and named in the log.
set -uo pipefail
OUT=${OUT:-device_out}
WORK=${WORK:-/tmp/mlpim_device}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-420} TESTS_S=${TESTS_S:-200} RUN_S=${RUN_S:-150} BENCH_S=${BENCH_S:-60}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MLPIM_CACHE=$WORK/cache

step() {  # step SECONDS NAME COMMAND...: run within its limit and the deadline, say how it ended
    local limit=$1 name=$2 start=$SECONDS left=$((DEADLINE - SECONDS))
    shift 2
    if ((left < 20)); then
        echo "=== $name: skipped, ${left} s left of DEADLINE=$DEADLINE"
        return
    fi
    echo "=== $name"
    timeout "$((limit < left ? limit : left))" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch; from importlib.metadata import version as v; print('torch',
torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported(),
torch.cuda.get_device_name(), *(f'{p} {v(p)}' for p in ('transformers', 'transformer-lens')))"
    $PY -m pip list 2>/dev/null | grep -iE "^(accelerate|datasets|fsspec|huggingface.hub|hydra.core|\
omegaconf|pyarrow|safetensors|tokenizers|transformer.lens) "  # what came with the image or .whl/
    git log -1 --format='mlpim commit %h %s' 2>/dev/null
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step "$TESTS_S" "cuda tests" $PY -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py \
    --junitxml="$OUT/cuda_tests.xml"

T="scripts/device_check.py time"
for shape in smollm2-135m:20 gemma3-270m:10; do
    name=${shape%%:*} layer=${shape##*:} dir=$WORK/$name
    step "$RUN_S" "build $name" $PY scripts/device_check.py build "$name" "$dir"
    model=(model=hf "model.path=$dir" device=cuda)  # the check reads the layer off the direction
    refs="extra.reference_cache=$WORK/refs_$name"
    step "$RUN_S" "$name: find the direction" $PY $T "$name run" "$OUT/timings.jsonl" -- \
        run experiment=ioi_mlp8_das "${model[@]}" "site.layer=$layer" "hydra.run.dir=$WORK/run_$name"
    for state in cold warm; do
        step "$RUN_S" "$name: check ($state)" $PY $T "$name check $state" "$OUT/timings.jsonl" -- \
            check "$WORK/run_$name/subspace.pt" "${model[@]}" "$refs" \
            "hydra.run.dir=$WORK/check_${name}_$state"
    done
done

for config in "tiny model=tiny model.arch=llama" "tiny-gemma3 model=tiny model.arch=gemma3" \
    "smollm2-135m model=hf model.path=$WORK/smollm2-135m site.layer=20" \
    "gemma3-270m model=hf model.path=$WORK/gemma3-270m site.layer=10"; do
    label=${config%% *}
    # shellcheck disable=SC2086  # the overrides are words
    step "$BENCH_S" "bench $label" $PY scripts/bench_das.py --skip-pyvene --min-seconds 1 \
        --out "$WORK/bench_$label.csv" ${config#* } device=cuda
done
$PY - "$WORK" "$OUT/bench.csv" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

found = sorted(Path(sys.argv[1]).glob("bench_*.csv"))
tables = [pd.read_csv(p).assign(config=p.stem.removeprefix("bench_")) for p in found]
if tables:
    pd.concat(tables, ignore_index=True).to_csv(sys.argv[2], index=False)
EOF
echo "=== done: $(ls "$OUT")"
