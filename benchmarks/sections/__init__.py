"""The benchmark's sections, grouped by what they measure; ``run.py`` lists them in ``SECTIONS``.

Each ``section_*`` function takes a ``harness.Config`` and returns the section's Markdown lines and its
rows for the summary table (``harness.Summary``); a section that feeds the plot returns its data third.
"""
