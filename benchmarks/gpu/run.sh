#!/usr/bin/env bash
# Runs benchmarks on the staged GPU machine (after stage1.sh and stage2.sh, while it stays warm).
#   bash benchmarks/gpu/run.sh JOB [JOB ...]     jobs: rollout16 rollout32 train hostadamw fsdp policy compiled reward recipe gil simmem render gputests smoke
# Each job writes $OUT/JOB.log (all its output) and $OUT/JOB.json (its JSON line); every JSON line also
# goes to $OUT/results.jsonl. The rollout jobs also keep $OUT/JOB.partial.json, the figures so far after each
# mode: what a run cut off by the call's time limit leaves. Extra arguments for a job: JOB_ARGS="..."
# (applied to every job); JOB_LIMIT=S stops each job after S seconds instead of its own limit.
set -uo pipefail
cd "$(dirname "$0")/../.."
JOBS="rollout16 rollout32 train hostadamw fsdp policy compiled reward recipe gil simmem render gputests smoke"
for job in "$@"; do
  [[ " $JOBS " == *" $job "* ]] || { echo "run.sh: unknown job '$job'; choose from $JOBS"; exit 2; }
done
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu/run.sh JOB [JOB ...]; jobs: $JOBS"; exit 2; }
source benchmarks/gpu/env.sh
install_tree  # the working tree's code, not a stale copy

# fail fast, naming what is missing (a cold machine lost /tmp/site: run stage1.sh and stage2.sh again)
python3 - <<'PY' || exit 2
import importlib, sys
missing = []
for name in ("torch", "torchrl", "tensordict", "mujoco", "numba", "sklearn", "robosuite", "libero.libero", "srpo_rl.envs"):
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - report every failure, then stop
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("run.sh: cannot import " + "; ".join(missing) + "\nrun benchmarks/gpu/stage1.sh then stage2.sh first")
import torch
if not torch.cuda.is_available():
    sys.exit("run.sh: torch sees no CUDA device")
print("run.sh: environment ok,", torch.cuda.get_device_name())
PY

# the CPU counters every 2 s (user, nice, system, idle, iowait, irq, softirq, steal): what the cores did
(while sleep 2; do echo "$(date +%s) $(head -n 1 /proc/stat)"; done) >> "$OUT/cpustat.log" 2>&1 &
CPULOG=$!
# and the host memory (free -m: total used free shared buff/cache available, MiB), then each Python process's
# proportional set size in MiB (shared pages split among their users): the offloaded optimizer state and the
# LIBERO processes share the host
pss_mib() { for pid in $(pgrep python); do awk '/^Pss:/ {printf "%d ", $2 / 1024}' "/proc/$pid/smaps_rollup" 2>/dev/null; done; }
(while sleep 3; do echo "$(date +%s) $(free -m | sed -n 2p) pss: $(pss_mib)"; done) >> "$OUT/mem.log" 2>&1 &
MEMLOG=$!
trap 'kill $CPULOG $MEMLOG 2>/dev/null' EXIT
status=0
for job in "$@"; do
  case "$job" in
    rollout16) cmd=(python3 benchmarks/rollout_throughput.py --num-envs 16 --partial "$OUT/$job.partial.json") limit=570 ;;
    rollout32) cmd=(python3 benchmarks/rollout_throughput.py --num-envs 32 --partial "$OUT/$job.partial.json") limit=570 ;;
    train) cmd=(python3 benchmarks/train_throughput.py) limit=420 ;;
    hostadamw) cmd=(python3 benchmarks/host_adamw.py --device cuda --params-m 2048) limit=120 ;;
    fsdp) cmd=(python3 benchmarks/fsdp_inference.py) limit=240 ;;
    policy) cmd=(python3 benchmarks/policy_latency.py) limit=150 ;;
    compiled) cmd=(python3 benchmarks/compiled_blocks.py) limit=420 ;;  # the 7B with its blocks compiled against eager
    reward) cmd=(python3 benchmarks/reward_throughput.py) limit=300 ;;
    recipe) cmd=(python3 benchmarks/recipe_iteration.py --out /tmp/recipe) limit=480 ;;
    gil) cmd=(python3 benchmarks/gil_contention.py) limit=60 ;;
    simmem) cmd=(python3 benchmarks/sim_memory.py) limit=180 ;;  # a LIBERO process's host memory: heap trimmed or not, asset cache on / off
    render) cmd=(python3 benchmarks/render_contention.py) limit=300 ;;  # what EGL renders cost a CUDA workload beside them
    gputests) cmd=(python3 -m pytest -q -p no:cacheprovider -m gpu tests) limit=300 ;;  # the tests CI skips
    smoke) continue ;;
  esac
  limit=${JOB_LIMIT:-$limit}  # JOB_LIMIT=S: stop each job after S seconds (a run cut short on purpose)
  echo "=== $job: ${cmd[*]} ${JOB_ARGS:-}"
  # shellcheck disable=SC2086
  timeout "$limit" "${cmd[@]}" ${JOB_ARGS:-} 2>&1 | tee "$OUT/$job.log"
  code=${PIPESTATUS[0]}
  if [ "$code" -ne 0 ]; then
    echo "=== $job failed with exit code $code (124: stopped after $limit s)"
    status=1
  fi
  # the JSON line is the last one a benchmark prints (worker exit noise may follow it)
  grep '^{"benchmark"' "$OUT/$job.log" | tail -n 1 > "$OUT/$job.json" && cat "$OUT/$job.json" >> "$OUT/results.jsonl"
done
exit $status
