"""The benchmark's sections, grouped by what they measure; ``benchmarks.run`` lists them in ``SECTIONS``.

Each ``section_*`` function takes a ``harness.Config`` and returns a ``report.SectionResult`` (the section's
Markdown lines and its rows of the summary table), or a subclass of it that also carries the section's numbers.
"""
