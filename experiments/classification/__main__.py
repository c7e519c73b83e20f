"""`python -m experiments.classification`: see main.py."""

from experiments.classification.main import run

# The guard matters: grain worker processes are spawned and re-import this module.
if __name__ == "__main__":
    run()
