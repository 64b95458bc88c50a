"""Every docstring example runs as written (those marked ``+SKIP`` need a GPU, a download or a whole run)."""

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("srpo_rl", "srpo_rl.envs", "srpo_rl.objectives", "srpo_rl.examples")


def modules() -> list[str]:
    names = set(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.walk_packages(path, package + ".")}
    return sorted(names)


@pytest.mark.parametrize("name", modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"
