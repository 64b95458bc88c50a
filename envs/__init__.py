"""LIBERO environments for TorchRL and gymnasium (installed as ``srpo_rl.envs``).

- :func:`make_libero_env` / :class:`LiberoVecEnv`: a batched TorchRL env of LIBERO simulations
  in worker processes, one action chunk per step, per-slot resets (:mod:`.libero`);
- :class:`LiberoSim`: one simulation in this process (:mod:`.sim`), with the chunk logic of
  :mod:`.chunk`;
- gymnasium ids ``LIBERO/<suite>-v0`` for every suite and alias, registered on import
  (:mod:`.gym`);
- suite names, aliases and per-suite episode lengths (:mod:`.suites`).

Importing this package does not import torch or LIBERO: worker processes import it too, and the
TorchRL names are loaded on first use.
"""

from .chunk import ChunkResult, num_frames, run_chunk, validate_chunk
from .gym import LiberoGymEnv, register_envs
from .sim import LiberoSim
from .suites import (
    INSTALL_COMMAND,
    RECIPE_MAX_STEPS,
    SUITE_ALIASES,
    SUITE_MAX_STEPS,
    SUITES,
    canonical_suite,
    default_max_steps,
    resolve_max_steps,
    suite_info,
)
from .workers import Failure, SimWorkers, WorkerError

__all__ = [
    "INSTALL_COMMAND",
    "RECIPE_MAX_STEPS",
    "SUITES",
    "SUITE_ALIASES",
    "SUITE_MAX_STEPS",
    "ChunkResult",
    "Failure",
    "LiberoGymEnv",
    "LiberoSim",
    "LiberoVecEnv",
    "SimWorkers",
    "WorkerError",
    "canonical_suite",
    "default_max_steps",
    "make_libero_env",
    "num_frames",
    "register_envs",
    "resolve_max_steps",
    "run_chunk",
    "suite_info",
    "validate_chunk",
]

register_envs()

_TORCH_NAMES = {"LiberoVecEnv", "make_libero_env"}


def __getattr__(name: str):
    # the TorchRL env imports torch: load it on first use only
    if name in _TORCH_NAMES:
        from . import libero

        return getattr(libero, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
