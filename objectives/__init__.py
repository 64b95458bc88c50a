"""SRPO learning rule: group advantages, sampling filters, loss (installed as ``srpo_rl.objectives``)."""
