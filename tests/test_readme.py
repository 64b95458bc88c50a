"""The README's code runs as written: the parts composed in a user's own script."""

import ast
import os
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block after the README heading ``section``."""
    text = README.read_text()
    return text[text.index(section):].split("```python", 1)[1].split("```", 1)[0]


def test_the_parts_example_runs(tmp_path):
    code = python_block("## Using the parts in your own TorchRL code")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # update_policy's metrics, printed
    assert metrics["optimizer_steps"] == 1 and abs(metrics["ratio_mean"] - 1.0) < 1e-4  # one step, on-policy
    assert {p.name for p in tmp_path.iterdir()} >= {"tiny_openvla_oft", "tiny_vjepa2.pt"}
