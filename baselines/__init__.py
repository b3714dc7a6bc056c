"""Selector plugins, InstructDiff (``instructdiff_selector``) and its baselines: one module and one YAML in
conf/selector/ each (docs/adding_a_selector.md).

This folder is installed as the import package ``instructdiff_baselines`` (pyproject.toml maps it), not as
``baselines``, which is another distribution's name on PyPI.
"""
