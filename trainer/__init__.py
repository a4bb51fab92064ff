"""The instrumented training runner: one validated config → model → LoRA → data → loop, watched by
the collector. Importing this package imports nothing heavy; `trainer.config` never needs torch."""
