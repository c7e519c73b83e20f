"""`python -m experiments.joint_upsampling`: see main.py."""

from experiments.joint_upsampling.main import run

run()
