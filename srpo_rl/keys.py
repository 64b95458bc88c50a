"""Renaming the tensordict keys a module reads and writes (the ``set_keys`` of TorchRL's ``LossModule``).

The reward transform, the advantage module and the sampler keep their keys in a dataclass of key names
(``tensor_keys``), as TorchRL's losses do; :func:`rename_keys` is their common ``set_keys`` body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tensordict.utils import NestedKey


def rename_keys(tensor_keys: Any, **kwargs: NestedKey) -> None:
    """Sets ``tensor_keys.<name> = key`` for each ``name=key``, refusing names the dataclass does not have.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Keys:
        ...     reward: str = "reward"
        >>> keys = Keys()
        >>> rename_keys(keys, reward=("next", "reward"))
        >>> keys.reward
        ('next', 'reward')
        >>> rename_keys(keys, rewards="r")
        Traceback (most recent call last):
        ...
        ValueError: unknown key name 'rewards'; choose one of reward
    """
    accepted = [field.name for field in dataclasses.fields(tensor_keys)]
    unknown = [name for name in kwargs if name not in accepted]
    if unknown:  # checked before any is set: a typo leaves the keys as they were
        raise ValueError(f"unknown key name {unknown[0]!r}; choose one of {', '.join(accepted)}")
    for name, key in kwargs.items():
        setattr(tensor_keys, name, key)
