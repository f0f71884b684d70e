"""l3m: domain adaptation of masked LMs (L3Masking and friends). See README.md."""

from l3m.quiet import quiet_load_reports, quiet_loading_bars

# Every process that loads a model through l3m (CLI, flows, workers, tests) gets one line per
# load instead of transformers' LOAD REPORT table.
quiet_load_reports()
quiet_loading_bars()
