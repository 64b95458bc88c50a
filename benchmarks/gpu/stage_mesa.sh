#!/usr/bin/env bash
# Installs the carried Mesa (.mesa/mesa.tar.xz, from build_mesa.sh) on the GPU machine after stage.sh, for
# LiberoVecEnv(cpu_render_slots=K): only the libraries the image lacks join the loader's path of the processes
# env.sh starts (LD_LIBRARY_PATH; the machine's own loader cache stays as it is), Mesa's EGL vendor file goes
# where libglvnd looks, env.sh points Mesa at the driver. Then it prints the renderer a CPU-render slot gets
# (llvmpipe), the pixels against the GPU's and one frame's time. The one call that ran an earlier version (which
# added the folder to the machine's loader cache with ldconfig) lost the machine, with no output: not run since.
#   bash benchmarks/gpu/stage.sh && bash benchmarks/gpu/stage_mesa.sh   (carry: .mesa, on a staged machine)
set -euo pipefail
cd "$(dirname "$0")/../.."
MESA=/tmp/mesa
if [ ! -f "$MESA/lib/libEGL_mesa.so.0" ]; then
  mkdir -p "$MESA" && tar xJf .mesa/mesa.tar.xz -C "$MESA"
fi
mkdir -p "$MESA/missing"
known=$(ldconfig -p | awk 'NR > 1 {print $1}')
for f in "$MESA"/lib/*.so*; do
  name=$(basename "$f")
  grep -qx "$name" <<<"$known" || ln -sf "$f" "$MESA/missing/$name"
done
echo "stage_mesa: the image lacked $(ls "$MESA/missing" | wc -l) of $(ls "$MESA"/lib/*.so* | wc -l) libraries: $(ls "$MESA/missing" | tr '\n' ' ')"
mkdir -p /usr/share/glvnd/egl_vendor.d
[ -f /usr/share/glvnd/egl_vendor.d/50_mesa.json ] || \
  printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_mesa.so.0"}}\n' \
  > /usr/share/glvnd/egl_vendor.d/50_mesa.json
source benchmarks/gpu/env.sh  # after the folder of missing libraries exists: it joins LD_LIBRARY_PATH
install_tree
# a file, not stdin: the workers are spawned and import the main module
cat > "$MESA/check.py" <<'PY'
import time

from srpo_rl.envs.workers import SimWorkers


def main() -> None:
    workers = SimWorkers({"suite": "libero_object", "image_size": 256}, [0, 0], cpu_render_slots=1)
    try:
        print("stage_mesa: renderers", workers.call({0: ("gl_renderer", ()), 1: ("gl_renderer", ())}))
        first = workers.call({0: ("reset", (4,)), 1: ("reset", (4,))})
        diff = abs(first[0]["image"].astype(int) - first[1]["image"].astype(int))
        print(f"stage_mesa: the same state, GPU against llvmpipe: mean |diff| {diff.mean():.3f}, max {diff.max()}, "
              f"pixels differing {(diff.max(0) > 0).mean():.4f}")
        for slot in (0, 1):
            t0 = time.perf_counter()
            for _ in range(10):
                workers.call({slot: ("render", ())})
            print(f"stage_mesa: slot {slot} renders a frame in {(time.perf_counter() - t0) / 10 * 1e3:.1f} ms")
    finally:
        workers.close()


if __name__ == "__main__":
    main()
PY
python3 "$MESA/check.py"
