"""``nnunetv2_em benchmark``: EM against vanilla nnU-Net on a dataset with trusted labels and seeded noise.

``noise`` (the annotation-noise settings), ``harness`` (arms, training, evaluation), ``report`` (tables, plots).
Not part of the EM core: nothing outside this package imports it except the CLI.
"""
