"""Pure functions over measurements: OOM message parsing, memory estimates, ranked fixes.
Nothing here yet: the diagnosis engine is issue #4."""
