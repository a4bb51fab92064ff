"""Pure functions over measurements: OOM message parsing, memory estimates, ranked fixes.

`python -m diagnosis parse|suggest|estimate|fit|snapshot` is the command line over them; the
runner's post-mortems and the dashboard call the same functions.
"""
