#!/usr/bin/env bash
# The quality grid on a GPU machine, one `lethe lab run` per (scenario, seed) so that a run cut
# short by the machine's time limit still leaves every finished seed's JSON behind.
#
#   benchmarks/gpu_lab.sh OUT_DIR DEADLINE_SECONDS "subset class backdoor" "0 1 2" [lab options]
#
# A (scenario, seed) is started only while more than LETHE_GPU_LAB_RESERVE seconds (default
# 150) remain before the deadline. The engine runs with the machine's own python3 (which has
# torch, torchvision, scikit-learn, click and tqdm) straight from the source tree, so nothing
# of the control plane has to be installed there. Merge the JSON files afterwards with
# benchmarks/quality.py, which pools the seeds of one scenario.
set -euo pipefail
out=$1 deadline=$2 scenarios=$3 seeds=$4
shift 4
reserve=${LETHE_GPU_LAB_RESERVE:-150}
start=$(date +%s)
mkdir -p "$out"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
for scenario in $scenarios; do
  for seed in $seeds; do
    left=$(( deadline - ($(date +%s) - start) ))
    if (( left <= reserve )); then
      echo "skip $scenario seed $seed: ${left}s left"
      continue
    fi
    echo "== $scenario seed $seed (${left}s left)"
    TQDM_DISABLE=1 timeout "$left" python3 -c 'from unlearning.cli import lab; lab()' run \
      --scenario "$scenario" --seeds "$seed" --device cuda \
      --out "$out/$scenario-seed$seed.json" "$@" 2>&1 | grep -v '^|' || true
  done
done
