"""Joint (guided) depth up-sampling with DDF-Up: synthetic training and Middlebury, or NYU Depth v2.

Run `python -m experiments.joint_upsampling --workdir DIR`; see README.md.
"""
