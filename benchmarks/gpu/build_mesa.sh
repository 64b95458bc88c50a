#!/usr/bin/env bash
# Builds .mesa/mesa.tar.xz here: Mesa's EGL library, its llvmpipe driver (swrast_dri.so) and every library they
# load beyond glibc and the C++ runtime, for LiberoVecEnv(cpu_render_slots=K) on the GPU machine, whose image
# has no Mesa. About 47 MB: it cannot travel with .carry (64 MiB a call), so a call carries it alone on a machine
# that stage.sh staged (warm), and stage_mesa.sh installs it.
# Usage (a Debian/Ubuntu machine with libegl-mesa0 and libgl1-mesa-dri): bash benchmarks/gpu/build_mesa.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
LIBDIR=/usr/lib/x86_64-linux-gnu
grep -qx "/.mesa/" .git/info/exclude 2>/dev/null || echo "/.mesa/" >> .git/info/exclude
TMP=$(mktemp -d) && mkdir -p "$TMP/lib/dri" .mesa
cp -L "$LIBDIR/libEGL_mesa.so.0" "$TMP/lib/"
cp -L "$LIBDIR/dri/swrast_dri.so" "$TMP/lib/dri/"
ldd "$LIBDIR/dri/swrast_dri.so" "$LIBDIR/libEGL_mesa.so.0" | awk '/=>/ {print $3}' | sort -u \
  | grep -v -E '/(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+)\.so' | xargs -I{} cp -L {} "$TMP/lib/"
tar cf - -C "$TMP" lib | xz -6 -T0 > .mesa/mesa.tar.xz
rm -rf "$TMP"
du -sh .mesa
