"""The viewer: `harness view RUN_DIR...` (a local web server over run folders) and `harness report --html`
(one self-contained file). Reads run folders through harness.runs / harness.metrics; nothing below
imports it."""
