"""Configs for `python -m experiments.classification --config=<file>`; each has `get_config()`."""
