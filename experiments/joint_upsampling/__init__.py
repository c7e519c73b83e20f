"""Joint (guided) depth up-sampling with DDF-Up: synthetic training, Middlebury evaluation.

Run `python -m experiments.joint_upsampling --workdir DIR`; see README.md.
"""
