"""Every attack mode's records, pinned: the single-process attack (the reference the Ray engine is
compared with in test_ray_evaluate.py; the ensemble is held to its members alone in test_ensemble.py)
must keep giving these records.

The values are the engine's records in float64 on the CPU: integers exact, sums of adversarial images to a
relative 1e-9, since the last bits of float64 convolutions and sums depend on the CPU's vector kernels. A new mode adds
a case here; `test_every_mode_is_pinned` fails until it does.
"""
import numpy as np
import pytest

from distributed_ebm.config import AttackConfig, AttackSettings, build
from distributed_ebm.method.attacks.modes import MODES
from distributed_ebm.recipes.attack import build_attack
from distributed_ebm.store.checkpoints import save_ebm
from distributed_ebm.store.data import read_images

from .conftest import RESNET20, TEST_EXACT, tiny_ebm

CASES = {  # attack settings over the common ones in _config
    "pgd_apgd_dlr": {"mode": "pgd", "optimizer": "apgd", "loss": "dlr", "steps": 4},
    "bpda": {"mode": "bpda_eot"},
    "exact_kink": {"mode": "exact_eot", "segment": 1, "surrogate": "softplus", "surrogate_temperature": 0.05},
    "transfer_apgd_reeval": {"mode": "transfer", "optimizer": "apgd", "reevaluations": 2},
    "defense_reeval": {"mode": "defense", "reevaluations": 2},
}

# per image: natural_protocol_pred, natural_defense_pred, broken_at, final_pred, image_steps, confirm_image_steps,
# reeval_correct, broken_by (ensemble, else None), sum of adv_image, sum of adv_image weighted by its flat position.
# image_steps includes the defense's own natural check, the 2-chain vote on every clean image (2 chains x 3 steps).
EXPECTED = {
    "pgd_apgd_dlr": [
        (3, 3, 3, 5, 0, 0, [], None, -460.8753920372692, -750530.8976904699),
        (8, 8, 3, 1, 0, 0, [], None, 666.6534274674486, 671596.0595281245),
        (8, 8, 2, 1, 0, 0, [], None, 122.35299351997674, -16565.679902594537),
        (0, 0, 2, 8, 0, 0, [], None, 658.298104878515, 827937.1915498534),
    ],
    "bpda": [
        (3, 3, -1, 3, 30, 6, [], None, -460.92449142249825, -750280.8115945617),
        (8, 8, -1, 8, 30, 6, [], None, 665.5430311609525, 669635.7282120264),
        (2, 2, 0, 2, 12, 6, [], None, 122.1333857178688, -16026.354408562183),
        (2, 2, 0, 2, 12, 6, [], None, 657.9843794107437, 827000.3445399404),
    ],
    "exact_kink": [
        (3, 3, -1, 3, 66, 6, [], None, -461.0502972973045, -750469.5966709418),
        (8, 8, -1, 8, 66, 6, [], None, 665.4709012808744, 669523.4085650677),
        (2, 2, 0, 2, 12, 6, [], None, 122.1333857178688, -16026.354408562183),
        (2, 2, 0, 2, 12, 6, [], None, 657.9843794107437, 827000.3445399404),
    ],
    "transfer_apgd_reeval": [
        (3, 3, -1, 3, 30, 6, [True, True], None, -460.9867701679468, -750979.3720505796),
        (8, 8, -1, 8, 30, 6, [True, True], None, 666.1207605955715, 670740.7466917168),
        (2, 2, 0, 2, 24, 6, [False, False], None, 122.1333857178688, -16026.354408562183),
        (2, 2, 0, 2, 24, 6, [False, False], None, 657.9843794107437, 827000.3445399404),
    ],
    "defense_reeval": [
        (3, 3, -1, 3, 24, 6, [True, True], None, -460.5332832932472, -750019.9880279899),
        (8, 8, -1, 8, 24, 6, [True, True], None, 665.2471062541008, 669434.7774375677),
        (2, 2, 0, 2, 24, 6, [False, False], None, 122.1333857178688, -16026.354408562183),
        (2, 2, 0, 2, 24, 6, [False, False], None, 657.9843794107437, 827000.3445399404),
    ],
}


@pytest.fixture(scope="module")
def ebm(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("modes") / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), url)
    return url


def _config(ebm, attack):
    return build(AttackConfig, {
        "data": {"path": TEST_EXACT, "indices": [0, 1, 2, 3]}, "classifier": {"weights": RESNET20}, "ebm": ebm,
        "purify": {"steps": 3, "noise": 0.05},
        "attack": {"eps": "2/255", "step_size": "1/255", "steps": 2, "eot_attack": 2, "eot_defense": 2, **attack},
        "precision": "float64", "seed": 5, "mlflow": {"enabled": False}})


def _summary(record) -> tuple:
    adv = record.adv_image.astype(np.float64).ravel()
    return (record.natural_protocol_pred, record.natural_defense_pred, record.broken_at, record.final_pred,
            record.image_steps, record.confirm_image_steps, record.reeval_correct, getattr(record, "broken_by", None),
            float(adv.sum()), float((adv * np.arange(adv.size)).sum()))


@pytest.mark.parametrize("name", CASES)
def test_records_are_the_pinned_ones(ebm, name):
    cfg = _config(ebm, CASES[name])
    data = read_images(cfg.data)
    got = [_summary(r) for r in build_attack(cfg, "cpu")(data.floats().double(), data.labels, data.ids)]
    for g, e in zip(got, EXPECTED[name], strict=True):
        assert g[:8] == tuple(e[:8]), (name, g[:8], e[:8])
        assert g[8:] == pytest.approx(e[8:], rel=1e-9, abs=1e-9), name  # float64 rounding: CPUs differ


def test_every_mode_is_pinned():
    pinned = {m.mode for c in CASES.values() for m in AttackSettings.model_validate(c).members()}
    assert pinned == set(MODES), set(MODES) - pinned
