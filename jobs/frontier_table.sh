#!/usr/bin/env bash
# Issue 14's side-by-side table: every attack on both EBMs at two budgets, on the same exact test
# images, with the same chains per gradient (4), steps (10) and confirmation (8 chains) for every
# attack, purifying with K = 100 (RESULTS.md's setting). Each run resumes where it stopped.
#
#     bash jobs/frontier_table.sh IMAGES RUNNER...
#
#   IMAGES   how many of the seeded random test images (RESULTS.md uses 40 and 200)
#   RUNNER   the command that runs an attack config with overrides, e.g.
#            .venv/bin/python jobs/attack.py --config          (Ray, this machine or a cluster)
#            python3 jobs/attack_local.py --device cuda --config   (one process, a lent GPU)
#
# EBMs: the paper's LeakyReLU one (models/ebm-cifar10-cpu) and MEFA's soft_lrelu one trained with the
# same CPU budget (EBM_SOFT, default models/ebm-cifar10-cpu-soft_lrelu/ebm.pt). Outputs go to
# runs/frontier/<ebm>_<budget>_<attack>; `debm report runs/frontier/*` prints the table afterwards.
set -euo pipefail
images=${1:?IMAGES}
shift
[ $# -ge 1 ] || { echo "usage: $0 IMAGES RUNNER..." >&2; exit 2; }
runner=("$@")
base=jobs/configs/results/defended_bpda_eot.yaml
ebm_lrelu=${EBM_LRELU:-models/ebm-cifar10-cpu/ebm.pt}
ebm_soft=${EBM_SOFT:-models/ebm-cifar10-cpu-soft_lrelu/ebm.pt}
out=${FRONTIER_OUT:-runs/frontier}

run() {  # name, overrides...
    local name=$1
    shift
    echo "== $name" >&2
    "${runner[@]}" "$base" data.random="$images" output="$out/$name" mlflow.enabled=false "$@"
}

for ebm in lrelu soft_lrelu; do
    if [ "$ebm" = lrelu ]; then
        file=$ebm_lrelu
        net=(ebm_net.activation=lrelu)
    else
        file=$ebm_soft
        net=(ebm_net.activation=soft_lrelu ebm_net.soft_alpha=0.49 ebm_net.soft_eps=0.01)
    fi
    for budget in 8 2; do
        common=(ebm="$file" "${net[@]}" attack.eps="$budget/255" attack.step_size="$budget/1020" attack.steps=10
                attack.eot_attack=4 attack.eot_defense=8 purify.steps=100)
        tag=${ebm}_${budget}
        run "${tag}_bpda" "${common[@]}" attack.mode=bpda_eot attack.reevaluations=3
        run "${tag}_exact" "${common[@]}" attack.mode=exact_eot attack.segment=10 attack.reevaluations=3
        if [ "$ebm" = lrelu ]; then
            run "${tag}_kink" "${common[@]}" attack.mode=exact_eot attack.segment=10 attack.surrogate=softplus \
                attack.surrogate_temperature=0.01 attack.reevaluations=3
        fi
        run "${tag}_apgd_ce" "${common[@]}" attack.mode=bpda_eot attack.optimizer=apgd attack.loss=ce attack.reevaluations=3
        run "${tag}_apgd_dlr" "${common[@]}" attack.mode=bpda_eot attack.optimizer=apgd attack.loss=dlr attack.reevaluations=3
        members="{mode: bpda_eot}, {mode: bpda_eot, optimizer: apgd, loss: ce}, {mode: bpda_eot, optimizer: apgd, loss: dlr}, {mode: exact_eot, segment: 10}"
        [ "$ebm" = lrelu ] && members="$members, {mode: exact_eot, segment: 10, surrogate: softplus}"
        run "${tag}_ensemble" "${common[@]}" attack.reevaluations=0 "attack.ensemble=[$members]"
    done
done
