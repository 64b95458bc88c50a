#!/usr/bin/env bash
# Stages the GPU machine in one call (carry: .carry, .gl and .carry2lite) unless it still holds what an earlier
# call staged: every call can then begin with it, whether the machine stayed warm or went cold.
#   bash benchmarks/gpu/stage.sh && bash benchmarks/gpu/run.sh JOB [JOB ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/env.sh
if python3 -c "import libero.libero, torchrl, tensordict, hydra, mujoco" 2>/dev/null; then
  echo "stage: $SITE is staged already (a warm machine)"
  exit 0
fi
bash benchmarks/gpu/stage1.sh
CARRY2="${CARRY2:-.carry2lite}" bash benchmarks/gpu/stage2.sh
