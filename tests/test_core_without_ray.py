"""The method core runs where only torch, numpy, pyarrow, pillow, pydantic, fsspec, pyyaml, tqdm and
matplotlib exist (a machine with one GPU): importing ray, mlflow, s3fs, boto3 or optuna is made to
fail, then data, purification, a defended attack, a training step and the attack's record files run."""
import subprocess
import sys

SCRIPT = r'''
import importlib.abc, sys

BLOCKED = ("ray", "mlflow", "s3fs", "boto3", "botocore", "aiobotocore", "optuna")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on this machine")
        return None

sys.meta_path.insert(0, Blocker())

import torch
from distributed_ebm.store import provenance
from distributed_ebm.results import records as results
from distributed_ebm.method.attacks import Attack
from distributed_ebm.config import AttackConfig, AttackSettings, TrainEBMConfig, load_config
from distributed_ebm.store.data import ImageSet, read_images
from distributed_ebm.method.defense import Purifier
from distributed_ebm.method.exact_chain import differentiable_langevin
from distributed_ebm.method.nets import EBM, build_classifier
from distributed_ebm.store.checkpoints import save_ebm
from distributed_ebm.method.noise import ChainKeys
from distributed_ebm.local.train import LocalTraining

torch.manual_seed(0)
ebm, clf = EBM(width=4), build_classifier("resnet20")
save_ebm(ebm, f"{sys.argv[1]}/ebm.pt")
cfg = load_config(AttackConfig, None, [f"ebm={sys.argv[1]}/ebm.pt", "data.count=3", f"output={sys.argv[1]}/attack"])
data = read_images(cfg.data)
settings = AttackSettings(mode="bpda_eot", steps=1, eot_attack=2, eot_defense=2)
records = Attack(clf, Purifier(ebm, steps=2), settings)(data.floats(), data.labels, data.ids)
results.write_part(cfg.output, records, provenance.attack_settings(cfg))
keys = ChainKeys.replicated(0, data.ids, 1)
differentiable_langevin(ebm, data.floats().requires_grad_(True), keys, 2, segment=1).sum().backward()
train = load_config(TrainEBMConfig, None, ["ebm.width=4", "langevin.steps=2", "batch_size=2", "bank_size=3"])
run = LocalTraining(train, ImageSet(data.floats().detach(), data.labels, data.ids))
m = run.step()
assert run.iteration == 1 and all(v == v for v in m.values()), m
print("core ok", len(records), sorted(k for k in BLOCKED if k in sys.modules))
'''


def test_core_runs_without_ray_mlflow_s3fs_boto3_optuna(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "core ok 3 []"


def test_the_progress_board_actor_loads_neither_torch_nor_the_project():
    """Every Ray Train run starts a board actor: its process imports the board's module only, not torch and the
    rest of the project."""
    script = ("import sys; import distributed_ebm.progress; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'distributed_ebm')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['distributed_ebm', 'distributed_ebm.progress']", done.stdout
