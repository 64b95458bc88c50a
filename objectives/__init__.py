"""SRPO learning rule: group advantages, sampling filters, loss (installed as ``srpo_rl.objectives``).

- :class:`GroupAdvantage` / :func:`group_advantages`: GRPO outcome advantages per group of
  trajectories, broadcast to every executed action token;
- :class:`EmbodiedSampler` / :func:`filter_groups`: success-rate and truncation filters,
  oversampling and the refill of the training batch across rollout rounds;
- :class:`SRPOLoss`: the token-level asymmetrically clipped policy loss.
"""

from .advantage import group_advantages, GroupAdvantage, token_mask_from_chunk_steps
from .sampling import EmbodiedSampler, filter_groups, SampleResult
from .srpo import AGGREGATIONS, clipped_token_loss, SRPOLoss

__all__ = [
    "AGGREGATIONS",
    "EmbodiedSampler",
    "GroupAdvantage",
    "SRPOLoss",
    "SampleResult",
    "clipped_token_loss",
    "filter_groups",
    "group_advantages",
    "token_mask_from_chunk_steps",
]
