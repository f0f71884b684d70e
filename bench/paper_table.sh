#!/usr/bin/env bash
# Reproduce docs/results.md: STL / RTM / L3 x 3 seeds on citation_intent and chemprot.
#   bench/paper_table.sh [OUTPUT_ROOT]
# The tuner table (docs/tuning.md) is the same script with other strategies/tuners/domains:
#   STRATS='strategies=[{kind: none}, {kind: l3}]' \
#   TUNERS='tuners=[{kind: child_f}, {kind: child_d}, {kind: weight_mask}]' \
#   DOMAINS=citation_intent bench/paper_table.sh runs/tuners
# Env: PY (python), L3M_MODEL_ROOT / L3M_DATA_ROOT (where minilm-l6-mlm and the data live),
#      PARALLEL=1 to train the seeds of both domains as concurrent processes (one GPU is
#      far from busy with a 22M-parameter model), DEADLINE seconds for the training phase.
set -uo pipefail
PY=${PY:-python}
export L3M_OUTPUT_ROOT=${1:-runs/paper}
mkdir -p "$L3M_OUTPUT_ROOT"
STRATS=${STRATS:-'strategies=[{kind: none}, {kind: random}, {kind: l3}]'}
TUNERS=${TUNERS:-'tuners=[{kind: full}]'}
COMMON=("$TUNERS" model.name_or_path=minilm-l6-mlm model.max_length=128 training.batch_size=32 training.lr=1e-4)
declare -A EXTRA=(
  [citation_intent]="training.epochs=20 training.early_stopping_patience=5"
  [chemprot]="training.epochs=6 training.early_stopping_patience=3"
)
read -r -a DOMAINS <<< "${DOMAINS:-citation_intent chemprot}"
SEEDS=(1 2 3)

for d in "${DOMAINS[@]}"; do  # score once per domain (a store read when already scored)
  $PY -m l3m.experiment "domains/$d.yaml" "$STRATS" "${COMMON[@]}" ${EXTRA[$d]} --prepare-only || exit 1
done
pids=()
for d in "${DOMAINS[@]}"; do
  for s in "${SEEDS[@]}"; do
    cmd=($PY -m l3m.experiment "domains/$d.yaml" "$STRATS" "${COMMON[@]}" ${EXTRA[$d]} "training.seeds=[$s]")
    if [ "${PARALLEL:-0}" = 1 ]; then
      OMP_NUM_THREADS=2 timeout "${DEADLINE:-100000}" "${cmd[@]}" > "$L3M_OUTPUT_ROOT/$d-seed$s.log" 2>&1 &
      pids+=($!)
    else
      "${cmd[@]}" > "$L3M_OUTPUT_ROOT/$d-seed$s.log" 2>&1
    fi
  done
done
for p in "${pids[@]}"; do wait "$p"; done
for d in "${DOMAINS[@]}"; do
  $PY -m l3m.experiment "domains/$d.yaml" "$STRATS" "${COMMON[@]}" ${EXTRA[$d]} --summarize-only
done
