"""Roofline analysis of Llama-family models: per-layer operations and bytes, placed under a chip's roofline.

Modules: ``zoo`` (models), ``hardware`` (chips, files, this machine), ``layers`` (ops and bytes per
layer), ``analyze`` (roofline, totals, memory planner, crossover, formatting; measured next to
predicted), ``measure`` (this machine's micro-benchmark; the rates of a measured row), ``profile``
(the engine timed op by op: ``edgellm analyze --measure``), ``plot`` (figures).
The command, ``edgellm analyze``, is :mod:`edgellm.cli.analyze`.
Nothing heavy is imported here, so ``edgellm --help`` stays fast.
"""
