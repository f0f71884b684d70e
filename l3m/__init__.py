"""l3m: domain adaptation of masked LMs (L3Masking and friends). See README.md."""

from l3m.quiet import quiet_load_reports

# Every process that loads a model through l3m (CLI, flows, workers, tests) gets one line per
# load instead of transformers' LOAD REPORT table.
quiet_load_reports()
# The weight-loading bars are turned off by the modules that load weights (l3m.modeling,
# l3m.scoring.engine, l3m.tuning.base): switching them here would import transformers with
# every light module (l3m.config, l3m.locking).
