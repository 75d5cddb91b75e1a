#!/usr/bin/env bash
# What the reduced counting costs (issue 22): the same BPDA+EOT attack on the same exact test images, once
# with RESULTS.md's reduced counting (4 chains per gradient and check, 8 to confirm) and once with the paper's
# (15 and 150), for the CPU LeakyReLU EBM, the GPU EBM and the noise-only control, at L-inf 8/255 and 2/255.
# Everything else as RESULTS.md: K = 100 (s = 1, sigma = 0.01), 10 PGD steps of eps/4, seed 0. Each run resumes.
#
#     bash benchmarks/experiments/counting_table.sh IMAGES RUNNER...
#
#   IMAGES   how many of the seeded random test images (data.random; RESULTS.md: 40, the frontier table's)
#   RUNNER   the command that runs an attack config with overrides, e.g.
#            .venv/bin/python jobs/attack_local.py --config    (one process; records equal the Ray engine's)
#            .venv/bin/python jobs/attack.py --config          (Ray, this machine or a cluster)
#
# Outputs: runs/counting/<system>_<budget>_<counting> (COUNTING_OUT); `debm report A B` pairs any two rows.
# Reduced rows first (cheap), then the paper's at 8/255, then at 2/255, so a run cut short leaves whole rows.
# COUNTING_SKIP: a bash regex of row names to leave out.
set -euo pipefail
images=${1:?IMAGES}
shift
[ $# -ge 1 ] || { echo "usage: $0 IMAGES RUNNER..." >&2; exit 2; }
runner=("$@")
out=${COUNTING_OUT:-runs/counting}
defended=jobs/configs/results/defended_bpda_eot.yaml
control=jobs/configs/results/control_noise_only.yaml

run() {  # name, config, overrides...
    local name=$1 config=$2
    shift 2
    if [ -n "${COUNTING_SKIP:-}" ] && [[ $name =~ $COUNTING_SKIP ]]; then
        echo "== $name: skipped (COUNTING_SKIP)" >&2
        return
    fi
    echo "== $name" >&2
    "${runner[@]}" "$config" data.random="$images" output="$out/$name" mlflow.enabled=false purify.steps=100 \
        attack.steps=10 "$@"
}

for row in "reduced 8" "reduced 2" "paper 8" "paper 2"; do
    read -r counting b <<< "$row"
    if [ "$counting" = reduced ]; then
        chains=(attack.eot_attack=4 attack.eot_defense=8 attack.reevaluations=2)
    else
        chains=(attack.eot_attack=15 attack.eot_defense=150 attack.reevaluations=0)
    fi
    common=(attack.eps="$b/255" attack.step_size="$b/1020" "${chains[@]}")
    run "cpu_lrelu_${b}_${counting}" "$defended" ebm=models/ebm-cifar10-cpu/ebm.pt "${common[@]}"
    run "gpu10k_${b}_${counting}" "$defended" ebm=models/ebm-cifar10-gpu/ckpt.pt "${common[@]}"
    run "control_${b}_${counting}" "$control" "${common[@]}"
done
