"""Column names shared by loading, cleaning and validation (one place, so they cannot drift)."""

SPLITS = ("train", "dev", "test")
TEXT, PAIR, LABEL = "text", "text_pair", "label"
# 1-based line of the row in its source file (for carved dev/test rows: their line in train).
LINE = "line"
