#!/usr/bin/env bash
# Issue 14's side-by-side table: every attack on both EBMs at two budgets, on the same exact test
# images, with the same chains per gradient (4), steps (10) and confirmation (8 chains) for every
# attack, purifying with K = 100 (RESULTS.md's setting). Each run resumes where it stopped.
#
#     bash benchmarks/experiments/frontier_table.sh IMAGES RUNNER...
#
#   IMAGES   how many of the seeded random test images (RESULTS.md uses 40 and 200)
#   RUNNER   the command that runs an attack config with overrides, e.g.
#            .venv/bin/python jobs/attack.py --config          (Ray, this machine or a cluster)
#            python3 jobs/attack_local.py --device cuda --config   (one process, e.g. on a GPU)
#
# EBMs: the paper's LeakyReLU one (models/ebm-cifar10-cpu) and MEFA's soft_lrelu one trained with the
# same CPU budget (EBM_SOFT, default models/ebm-cifar10-cpu-soft_lrelu/ebm.pt). Outputs go to
# runs/frontier/<ebm>_<budget>_<attack>; `debm report runs/frontier/*` prints the table afterwards.
# FRONTIER_SKIP: a bash regex of row names to leave out (e.g. '_ensemble$': an ensemble's records equal
# its attacks' run alone, tests/test_ensemble.py, so the worst case can be read from those rows).
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
    if [ -n "${FRONTIER_SKIP:-}" ] && [[ $name =~ $FRONTIER_SKIP ]]; then
        echo "== $name: skipped (FRONTIER_SKIP)" >&2
        return
    fi
    echo "== $name" >&2
    "${runner[@]}" "$base" data.random="$images" output="$out/$name" mlflow.enabled=false "$@"
}

# attack by attack, each on both EBMs, the cheap attacks first: a run cut short leaves whole pairs
for budget in 8 2; do
    for attack in bpda exact kink apgd_ce apgd_dlr ensemble; do
        for ebm in soft_lrelu lrelu; do
            if [ "$ebm" = lrelu ]; then
                file=$ebm_lrelu
                net=(ebm_net.activation=lrelu)
            else
                [ "$attack" = kink ] && continue  # kink-aware gradients are for the piecewise-linear EBM
                file=$ebm_soft
                net=(ebm_net.activation=soft_lrelu ebm_net.soft_alpha=0.49 ebm_net.soft_eps=0.01)
            fi
            common=(ebm="$file" "${net[@]}" attack.eps="$budget/255" attack.step_size="$budget/1020" attack.steps=10
                    attack.eot_attack=4 attack.eot_defense=8 purify.steps=100)
            name=${ebm}_${budget}_${attack}
            case $attack in
            bpda) run "$name" "${common[@]}" attack.mode=bpda_eot attack.reevaluations=3 ;;
            exact) run "$name" "${common[@]}" attack.mode=exact_eot attack.segment=10 attack.reevaluations=3 ;;
            kink) run "$name" "${common[@]}" attack.mode=exact_eot attack.segment=10 attack.surrogate=softplus \
                      attack.surrogate_temperature=0.01 attack.reevaluations=3 ;;
            apgd_ce) run "$name" "${common[@]}" attack.mode=bpda_eot attack.optimizer=apgd attack.loss=ce attack.reevaluations=3 ;;
            apgd_dlr) run "$name" "${common[@]}" attack.mode=bpda_eot attack.optimizer=apgd attack.loss=dlr attack.reevaluations=3 ;;
            ensemble)
                members="{mode: bpda_eot}, {mode: bpda_eot, optimizer: apgd, loss: ce}, {mode: bpda_eot, optimizer: apgd, loss: dlr}, {mode: exact_eot, segment: 10}"
                [ "$ebm" = lrelu ] && members="$members, {mode: exact_eot, segment: 10, surrogate: softplus, surrogate_temperature: 0.01}"
                # paired keys: each member draws the run seed's keys, as its row alone does, so the ensemble's
                # robust images are exactly those every member's row leaves robust
                run "$name" "${common[@]}" attack.reevaluations=0 attack.ensemble_keys=paired "attack.ensemble=[$members]" ;;
            esac
        done
    done
done
