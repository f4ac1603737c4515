"""Attacks from the paper and the adaptive ones (PGD, Orthogonal PGD), batched on any device. Every attack takes a module returning
decision logits (so CE and RCE models are handled alike) and returns the adversarial
batch; ``return_info=True`` adds per-example diagnostics (:class:`AttackInfo`)."""
from ._common import AttackInfo
from .cw import cw_l2, cw_wb
from .gradient import bim, fgsm, ilcm, rand_noise
from .jsma import jsma, jsma_pairs
from .pgd import orthogonal_pgd, pgd

__all__ = ["AttackInfo", "fgsm", "bim", "ilcm", "rand_noise", "cw_l2", "cw_wb", "jsma",
           "jsma_pairs", "pgd", "orthogonal_pgd"]
