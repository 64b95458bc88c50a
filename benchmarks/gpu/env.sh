# Sourced by stage1.sh, stage2.sh and run.sh: where the carried packages live and how to render.
# /tmp/site holds the carried packages (it lasts while the machine stays warm); /tmp/srpo holds this
# repository's package, copied from the working tree by every run.sh, so it is never stale.
SITE=/tmp/site
PKG=/tmp/srpo
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1 RL_WARNINGS=0
# the repo root holds srpo_rl/ without envs/ (setuptools maps it): never import from the current folder
export PYTHONSAFEPATH=1 PYTHONPATH="$PYTHONPATH:$PWD/benchmarks"  # benchmarks import each other
# the GPU's EGL driver, where the image ships its vendor file (the device README's fallback)
if [ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" ] && [ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ]; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
# Mesa carried by stage_mesa.sh (cpu_render_slots): its driver is not where Mesa looks by default
if [ -d /tmp/mesa/missing ]; then
  export LIBGL_DRIVERS_PATH=/tmp/mesa/lib/dri LD_LIBRARY_PATH="/tmp/mesa/missing${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
OUT="${OUT:-/tmp/out}"
mkdir -p "$SITE" "$OUT"

# the repository's package as setuptools would install it (pyproject.toml's package-dir mapping)
install_tree() {
  rm -rf "$PKG" && mkdir -p "$PKG"
  cp -r srpo_rl "$PKG/srpo_rl"
  cp -r envs "$PKG/srpo_rl/envs"
  cp -r objectives "$PKG/srpo_rl/objectives"
  cp -r examples "$PKG/srpo_rl/examples"
}
