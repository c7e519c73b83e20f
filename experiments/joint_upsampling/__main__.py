"""`python -m experiments.joint_upsampling`: see main.py."""

from experiments.joint_upsampling.main import run

# The guard matters: grain worker processes are spawned and re-import this module.
if __name__ == "__main__":
    run()
