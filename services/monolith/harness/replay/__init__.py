"""`monolith replay`: MovieLens-100k as live traffic through a running stack.

- `traffic`: the data in time order, split into the batch part and the replayed part,
  with the raw feature values a product backend would send for each rating.
- `pacing`: when each replayed event is due at `--speed` events per second.
- `bookkeeping`: progressive and rolling AUC, percentiles, and the reconciliation of the
  samples the joiner produced against those the replay expects.
- `frozen`: a copy of the model frozen right after the batch stage, scored in process.
- `probe`: the end-to-end freshness probe (report_action to the served score changing).
- `samples`: closing the joiner's windows at the end and reading the SAMPLES stream back.
- `launcher`: `monolith up` as a child process (`--up`) and the stack's `stack.json`.
- `runner`: the stages, the live progress line and the result; `report`: the summary
  table and the plot; `service`: the CLI.
"""
