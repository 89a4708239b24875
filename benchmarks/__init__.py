"""RevCol's benchmark suite; run it from the repository root as ``python -m benchmarks.run`` (see ``run.py``).

``harness`` holds the configuration, model building, timing and training steps; ``report`` the result types, the
summary table and the plot; ``sections`` the sections, one module per group; ``baseline`` the authors'-style
reference network that the no-regression goals are measured against.
"""
