"""The LIBERO env on a MuJoCo newer than the pinned 3.3.2, in a child pytest.

MuJoCo 3.17.0 goes into a temporary folder (``pip install --no-deps --target``) put first on the ``PYTHONPATH``
of a child pytest that runs ``test_fast_osc.py`` and ``test_render_fidelity.py`` there: the fast arm-control
substeps stay bit-identical to robosuite's (MuJoCo has no ``MjData.qM`` from 3.10 on, and ``mj_fullM`` takes the
data), and the legacy look draws the textures as 3.3.2 did, in ``LiberoSim`` and in the batched env's workers
(on 3.3.2 it is a no-op, so only this run checks it).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

NEWER_MUJOCO = "3.17.0"
TESTS = Path(__file__).parent


def test_fast_substeps_and_the_legacy_look_on_a_newer_mujoco(tmp_path):
    target = tmp_path / "mujoco"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              f"mujoco=={NEWER_MUJOCO}"], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"mujoco=={NEWER_MUJOCO} cannot be installed here: {install.stderr[-500:]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]))
    version = subprocess.run([sys.executable, "-c", "import mujoco; print(mujoco.__version__)"], env=env,
                             capture_output=True, text=True, check=True)
    assert version.stdout.strip() == NEWER_MUJOCO
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fast_osc.py", "test_render_fidelity.py"],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=900,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]
