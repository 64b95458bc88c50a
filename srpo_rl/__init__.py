"""srpo_rl: SRPO / GRPO fine-tuning of Vision-Language-Action policies with TorchRL.

The parts compose in your own TorchRL code:

- :mod:`srpo_rl.envs` -- LIBERO suites as batched, chunk-executing TorchRL envs (and gymnasium envs);
- :mod:`srpo_rl.policy` -- OpenVLA-OFT as a TorchRL policy (action tokens, log-probs, chunks);
- :mod:`srpo_rl.rewards` -- the SRPO world-model progress reward (V-JEPA 2);
- :mod:`srpo_rl.objectives` -- group advantages, embodied sampling filters and ``SRPOLoss``;
- :mod:`srpo_rl.manifest` -- task manifests (suite x task x init state) as parquet files.
"""

__version__ = "0.1.0"
