"""nnunetv2-em: Expectation-Maximization label refinement around nnU-Net v2.

Kept import-free: ``nnunetv2_em_hook.pth`` imports this package in every interpreter of the environment.
"""

__version__ = "0.1.0"
