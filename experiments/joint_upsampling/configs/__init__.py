"""Configs for `python -m experiments.joint_upsampling --config=<file>`; each has `get_config()`."""
