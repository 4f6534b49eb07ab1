"""``nnunetv2_em benchmark``: EM against vanilla nnU-Net and a cleanlab peer on a dataset with trusted labels and
seeded noise, as noise settings x training seeds.

``noise`` (annotation-noise protocols and settings), ``harness`` (one replicate: arms, training, evaluation),
``metrics`` (label quality, detection, ranking, paired intervals), ``suite`` (settings x seeds, summary),
``report`` (tables, plots). Not part of the EM core: nothing outside this package imports it except the CLI.
"""
