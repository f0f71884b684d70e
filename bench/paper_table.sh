#!/usr/bin/env bash
# Reproduce docs/results.md from the paper profiles (configs/paper/<domain>-<MODEL>.yaml):
#   1. the main table: STL / RTM / L3 x SEEDS on each domain (paired-bootstrap CIs in the table);
#   2. the ablations on citation_intent, L3 only, ABLATION_SEEDS: fixed lambda in {0.1, 0.3, 1.0}
#      against meta_tartan (the main table's L3 runs, reused by identity). Stage 2 off needs no
#      runs: stage 1 is identical with and without it, and every run records its stage-1 scores
#      (the "Stage 2" table of each results.md).
#   bench/paper_table.sh [OUTPUT_ROOT]
# Env: PY (python); MODEL (minilm: the shared model, default; roberta: needs the hub);
#      DOMAINS, SEEDS, ABLATION_SEEDS; BUDGET: extra overrides for every run (docs/results.md
#      gives the CPU grid's); PARALLEL=1: every (domain, seed) and ablation run is its own process,
#      JOBS of them at a time (default all at once: one GPU is far from busy with one small model;
#      on a CPU, JOBS=2 with OMP_NUM_THREADS=1); DEADLINE: seconds per process; SNAPSHOTS: a folder
#      of validated data snapshots, one per domain (SNAPSHOTS/<domain>), read instead of the raw
#      files (bench/gpu_check.sh: the GPU machine has no Great Expectations or raw data).
# A rerun reuses every finished run (run identity) and resumes interrupted ones, so a script
# killed by its deadline is finished by running it again.
set -uo pipefail
PY=${PY:-python}
export L3M_OUTPUT_ROOT=${1:-runs/paper}
mkdir -p "$L3M_OUTPUT_ROOT/logs"
MODEL=${MODEL:-minilm}
read -r -a DOMAINS <<< "${DOMAINS:-citation_intent chemprot}"
read -r -a SEEDS <<< "${SEEDS:-1 2 3 4 5}"
read -r -a ABL_SEEDS <<< "${ABLATION_SEEDS:-1 2 3}"
read -r -a BUDGET <<< "${BUDGET:-}"
L3='strategies=[{kind: l3, mode: paper}]'
ABLATIONS=(
  "fixed-0.1|weighting.kind=fixed training.mlm_weight=0.1"
  "fixed-0.3|weighting.kind=fixed training.mlm_weight=0.3"
  "fixed-1.0|weighting.kind=fixed training.mlm_weight=1.0"
  "meta_tartan|weighting.kind=meta_tartan"
)
seeds_list() { local IFS=,; echo "[$*]"; }
snap() { if [ -n "${SNAPSHOTS:-}" ]; then echo "--snapshot=$SNAPSHOTS/$1"; fi; }

pids=()
launch() {  # launch LOG ARGS...: one experiment process, in the background with PARALLEL=1
  local log=$1; shift
  if [ "${PARALLEL:-0}" = 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1000}" ]; do wait -n; done
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout "${DEADLINE:-100000}" "$@" > "$log" 2>&1 &
    pids+=($!)
  else
    timeout "${DEADLINE:-100000}" "$@" > "$log" 2>&1
  fi
}

for d in "${DOMAINS[@]}"; do  # validate + score once per domain (a store read when already done)
  $PY -m l3m.experiment $(snap "$d") "configs/paper/$d-$MODEL.yaml" "${BUDGET[@]}" --prepare-only \
    > "$L3M_OUTPUT_ROOT/logs/$d-prepare.log" 2>&1 || { echo "prepare $d failed: see logs"; exit 1; }
done
for d in "${DOMAINS[@]}"; do
  for s in "${SEEDS[@]}"; do
    launch "$L3M_OUTPUT_ROOT/logs/$d-seed$s.log" \
      $PY -m l3m.experiment $(snap "$d") "configs/paper/$d-$MODEL.yaml" "${BUDGET[@]}" "training.seeds=[$s]"
  done
done
for a in "${ABLATIONS[@]}"; do
  name=${a%%|*}; read -r -a over <<< "${a#*|}"
  for s in "${ABL_SEEDS[@]}"; do
    launch "$L3M_OUTPUT_ROOT/logs/ablation-$name-seed$s.log" \
      $PY -m l3m.experiment $(snap citation_intent) "configs/paper/citation_intent-$MODEL.yaml" "${BUDGET[@]}" "$L3" "${over[@]}" "training.seeds=[$s]"
  done
done
for p in "${pids[@]}"; do wait "$p"; done

# The tables: each experiment over all its seeds (every run is reused; none trains here unless
# one was cut by the deadline, which then resumes).
for d in "${DOMAINS[@]}"; do
  $PY -m l3m.experiment $(snap "$d") "configs/paper/$d-$MODEL.yaml" "${BUDGET[@]}" "training.seeds=$(seeds_list "${SEEDS[@]}")" \
    > "$L3M_OUTPUT_ROOT/logs/$d-table.log" 2>&1
  grep -E "^(results|md):|^md" "$L3M_OUTPUT_ROOT/logs/$d-table.log"
done
for a in "${ABLATIONS[@]}"; do
  name=${a%%|*}; read -r -a over <<< "${a#*|}"
  $PY -m l3m.experiment $(snap citation_intent) "configs/paper/citation_intent-$MODEL.yaml" "${BUDGET[@]}" "$L3" "${over[@]}" \
    "training.seeds=$(seeds_list "${ABL_SEEDS[@]}")" > "$L3M_OUTPUT_ROOT/logs/ablation-$name-table.log" 2>&1
  echo "$name: $(grep -E '^md:' "$L3M_OUTPUT_ROOT/logs/ablation-$name-table.log")"
done
