#!/usr/bin/env bash
# Stage 2 of 2 on the GPU machine (carry: .carry2), right after stage1.sh: numba + llvmlite, torchrl,
# tensordict, scikit-learn and this project; then checks that a LIBERO env steps and renders.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/env.sh
start=$SECONDS

[ -f "$SITE/libero/libero/__init__.py" ] || { echo "stage2: /tmp/site has no LIBERO: the machine went cold; run stage1.sh again first"; exit 2; }
# CARRY2: the carried folder (default .carry2); a slim one without numba / scikit-learn serves where the image
# has them, and then fits one call with stage1's .carry (benchmarks/gpu/README.md)
CARRY2="${CARRY2:-.carry2}"
[ -f "$CARRY2/hydra.tar.xz" ] || { echo "stage2: $CARRY2/hydra.tar.xz is missing: carry $CARRY2"; exit 2; }

# numba + llvmlite: their two wheels unpacked and recompressed (64 MB of wheels -> 44 MB of xz)
if [ -f "$CARRY2/numba_llvmlite.tar.xz" ]; then
  tar xJf "$CARRY2/numba_llvmlite.tar.xz" -C "$SITE"
else
  python3 -c "import numba, sklearn" || { echo "stage2: the image lacks numba or scikit-learn: carry .carry2"; exit 2; }
fi
tar xJf "$CARRY2/hydra.tar.xz" -C "$SITE"  # Hydra + OmegaConf + antlr4 for examples/srpo_libero.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY2"/*.whl
install_tree

python3 - <<'PY'
import importlib
for name in ("numba", "llvmlite", "torchrl", "tensordict", "sklearn", "mujoco", "robosuite", "hydra", "omegaconf",
             "srpo_rl.envs", "srpo_rl.examples.utils_srpo"):
    module = importlib.import_module(name)
    print(f"stage2: {name} {getattr(module, '__version__', '')} from {module.__file__.rsplit('/', 2)[0]}")
PY
# a file, not stdin: the env's worker processes are spawned and re-import the main script by its path
cat > /tmp/srpo_stage2_smoke.py <<'PY'
import time
import torch
from tensordict import TensorDict
from srpo_rl.envs import make_libero_env

if __name__ == "__main__":
    t0 = time.perf_counter()
    env = make_libero_env("libero_object", 2, max_steps=64)
    td = env.reset()
    image = td["observation", "image"][0].float()  # slot 0: task 0, init state 0
    out = env.step(TensorDict({"action": torch.zeros(2, 8, 7)}, [2]))["next"]
    print(f"stage2: LIBERO libero_object x2 built, reset and stepped in {time.perf_counter() - t0:.1f} s; "
          f"agentview mean pixel {image.mean():.1f} (about 139 with mujoco<=3.3.2's look, 103 with later versions), "
          f"chunk_steps {out['chunk_steps'].flatten().tolist()}")
    env.close()
PY
python3 /tmp/srpo_stage2_smoke.py
echo "stage2: done in $((SECONDS - start)) s"
