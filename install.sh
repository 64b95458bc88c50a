#!/usr/bin/env bash
# Sets up srpo_rl in ./.venv: system rendering libraries, torch, then the package with its LIBERO and dev extras.
#   bash install.sh            # idempotent: a second run only checks what is there
# Environment: PYTHON (default python3, must be >= 3.11), SRPO_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${SRPO_VENV:-.venv}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "srpo_rl needs Python >= 3.11; set PYTHON=python3.11 (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

# Headless rendering (MuJoCo through EGL; Mesa's llvmpipe on machines without a GPU).
need_libs=()
libs=(libEGL.so.1 libGL.so.1 libOpenGL.so.0)
command -v nvidia-smi >/dev/null 2>&1 || libs+=(libEGL_mesa.so.0)  # CPU rendering goes through Mesa's EGL
for lib in "${libs[@]}"; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_libs+=("$lib")
done
if [ ${#need_libs[@]} -gt 0 ]; then
  apt_cmd="apt-get update && apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libopengl0"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing rendering libraries (${need_libs[*]} missing)"
    sh -c "$apt_cmd" >/dev/null
  else
    echo "missing ${need_libs[*]} for headless rendering; run as root: $apt_cmd" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraints=(-c constraints-cpu.txt)
  "$VENV/bin/python" -c 'import torch' 2>/dev/null || "${PIP[@]}" install torch==2.13.0
fi
"${PIP[@]}" install "${constraints[@]}" -e ".[libero,dev]"
echo "srpo_rl installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
