"""Attacks from the paper, batched on any device. Every attack takes a module returning
decision logits (so CE and RCE models are handled alike) and returns the adversarial
batch; ``return_info=True`` adds per-example diagnostics (:class:`AttackInfo`)."""
from ._common import AttackInfo
from .jsma import jsma, jsma_pairs

__all__ = ["AttackInfo", "jsma", "jsma_pairs"]
