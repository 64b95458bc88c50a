"""LIBERO environments for TorchRL and gymnasium (installed as ``srpo_rl.envs``)."""
