#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): every part of l3m that needs a GPU, sized to
# finish on one lent GPU inside a 10-minute call, or to stop cleanly at DEADLINE and resume.
#
#   bench/gpu_check.sh prepare    here, in .venv: validate + snapshot the paper domains, the model
#                                 in float16, the missing wheels -> .bench/gpu_carry (the one carry
#                                 path); prints the device command and the transfer's size
#   bench/gpu_check.sh [run]      on the GPU machine: the parts below, into GPU_CHECK_DIR
#   bench/gpu_check.sh copy DIR   what would travel, copied to DIR (for a dry run elsewhere)
#
# Parts (bench/gpu_check.py runs each as its own process): setup (wheels, fp32 model, versions),
# tests (pytest -m gpu), scoring_exact (bf16 tokens/s, % of the bf16 matmul peak measured in the
# run), scoring_strided (tokens/s, Spearman vs exact), serving (bf16 classifier forward, batched
# vs batch 1), train (L3 + META-TARTAN + stage 2 in bf16), paper_table (PARALLEL=1
# bench/paper_table.sh at the authors' full budget, given whatever time is left).
# Env: DEADLINE (seconds from the start, default 540), GPU_CHECK_DIR (default .bench/gpu_check),
#      SMALL=1 (tiny sizes: the CPU dry run; the default where there is no CUDA), FORCE=1 (rerun
#      finished parts), PY (python; default python3, or .venv/bin/python for prepare), WHEELS.
# A rerun skips finished parts and resumes the paper table's runs from their checkpoints. With
# $OUT set (the device tool), summary.json, summary.md and logs.tar.gz are copied there.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
CARRY=.bench/gpu_carry
WORK=${GPU_CHECK_DIR:-.bench/gpu_check}

case "${1:-run}" in
  prepare)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
    exec "${PY:-.venv/bin/python}" bench/gpu_prepare.py "${@:2}"
    ;;
  run)
    PY=${PY:-python3}
    mkdir -p "$WORK"
    # The wheels the library needs and this Python lacks, once per machine (a warm machine keeps
    # them). WHEELS overrides the folder (the CPU dry run's simulated device uses its own Python's).
    WHEELS=${WHEELS:-$CARRY/whl}
    if ! "$PY" -c "import pydantic, datasets" 2> /dev/null && [ ! -f "$WORK/site/.installed" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl && touch "$WORK/site/.installed" \
        || echo "gpu_check: installing the carried wheels failed; parts that import l3m will fail"
    fi
    [ -d "$WORK/site" ] && export PYTHONPATH="$PWD/$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
      PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 GPU_CHECK_START=$START
    exec "$PY" bench/gpu_check.py --work "$WORK" --carry "$CARRY" "${@:2}"
    ;;
  copy)  # what the device tool sends (tracked + untracked-not-ignored files, and the carry) into
         # DIR: the CPU dry run runs from such a copy, with no ../shared beside it
    dst=${2:?usage: bench/gpu_check.sh copy DIR}
    mkdir -p "$dst"
    { git ls-files -z --cached --others --exclude-standard; find "$CARRY" -type f -print0; } \
      | tar --null --ignore-failed-read -T - -cf - 2> /dev/null | tar -xf - -C "$dst"
    du -sh "$dst"
    ;;
  *)
    echo "usage: bench/gpu_check.sh [prepare|run|copy DIR] [options]" >&2
    exit 2
    ;;
esac
