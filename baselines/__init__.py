"""Baseline selector plugins: one module each, one YAML each in conf/selector/."""
