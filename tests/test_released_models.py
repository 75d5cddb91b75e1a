"""Released models read as they are (method/nets/formats.py, store/released.py), `debm import`, and each
paper's protocol (jobs/configs/papers/) end to end on synthetic weights written in the sources' own layouts.

The networks are checked against implementations written here independently: plain functional forwards over
the state dicts (torch.nn.functional only), as the authors' code computes them."""
import hashlib
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.errors import InputError
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.method.nets.formats import format_table
from distributed_ebm.recipes.attack import build_attack, run_attack
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import load_classifier
from distributed_ebm.store.released import load_ebm

from .conftest import TEST_EXACT

PAPERS = "jobs/configs/papers"


# ---- the sources' layouts, written as their code writes them ----

def ss_ebm_state(width=8, seed=0, scale=1.0):
    """The Stochastic Security / MEFA EBM's state dict: nn.Sequential `f`, convs at 0, 2, 4, 6, 8."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(width, 3, 3, 3), (2 * width, width, 4, 4), (4 * width, 2 * width, 4, 4), (8 * width, 4 * width, 4, 4),
              (1, 8 * width, 4, 4)]
    state = {}
    for i, shape in zip((0, 2, 4, 6, 8), shapes):
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"f.{i}.weight"] = torch.randn(shape, generator=g) / fan_in ** 0.5
        state[f"f.{i}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    state["f.8.weight"] *= scale
    return state


def wrn_state(depth=10, widen=1, classes=10, norm=True, prefix="", seed=0):
    """The wide-resnet.pytorch WRN's state dict (Stochastic Security's classifier; JEM's trunk without BN)."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, cin, cout, k):
        state[f"{prefix}{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
        state[f"{prefix}{name}.bias"] = torch.randn(cout, generator=g) * 0.05

    def bn(name, c):
        if norm:
            state[f"{prefix}{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
            state[f"{prefix}{name}.bias"] = 0.1 * torch.randn(c, generator=g)
            state[f"{prefix}{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
            state[f"{prefix}{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
            state[f"{prefix}{name}.num_batches_tracked"] = torch.tensor(100)

    n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    conv("conv1", 3, 16, 3)
    cin = 16
    for layer, cout in zip((1, 2, 3), widths[1:]):
        for i in range(n):
            b = f"layer{layer}.{i}"
            bn(f"{b}.bn1", cin)
            conv(f"{b}.conv1", cin, cout, 3)
            bn(f"{b}.bn2", cout)
            conv(f"{b}.conv2", cout, cout, 3)
            if i == 0 and (layer > 1 or cin != cout):
                conv(f"{b}.shortcut.0", cin, cout, 1)
            cin = cout
    bn("bn1", cin)
    state[f"{prefix}linear.weight"] = torch.randn(classes, cin, generator=g) / cin ** 0.5
    state[f"{prefix}linear.bias"] = torch.zeros(classes)
    return state


def jem_file(depth=10, widen=1, seed=0):
    state = wrn_state(depth, widen, norm=False, prefix="f.", seed=seed)
    width = 64 * widen
    g = torch.Generator().manual_seed(seed + 1)
    state["energy_output.weight"], state["energy_output.bias"] = torch.randn(1, width, generator=g), torch.zeros(1)
    state["class_output.weight"] = torch.randn(10, width, generator=g) / width ** 0.5
    state["class_output.bias"] = 0.1 * torch.randn(10, generator=g)
    return {"model_state_dict": state, "replay_buffer": torch.rand(20, 3, 32, 32) * 2 - 1}


def save_legacy(obj, path):
    """As torch 1.4 wrote `model.state_dict()`: an OrderedDict with its `_metadata`, pre-zip serialization."""
    if all(torch.is_tensor(v) for v in obj.values()):
        obj = OrderedDict(obj)
        obj._metadata = OrderedDict((k.rpartition(".")[0], {"version": 1}) for k in obj)
    torch.save(obj, str(path), _use_new_zipfile_serialization=False)
    assert not storage.read_bytes(str(path)).startswith(b"PK")
    return str(path)


# ---- independent forwards ----

def soft_lrelu(x):
    return 0.51 * x + 0.49 * torch.sqrt(x * x + 1e-4) - 0.49 * 0.01


def ref_conv_ebm(state, x, act):
    for i, (stride, pad) in zip((0, 2, 4, 6), ((1, 1), (2, 1), (2, 1), (2, 1))):
        x = act(F.conv2d(x, state[f"f.{i}.weight"], state[f"f.{i}.bias"], stride, pad))
    return F.conv2d(x, state["f.8.weight"], state["f.8.bias"]).squeeze()


def ref_wrn_features(state, x, prefix="", norm=True, slope=0.0):
    p = prefix

    def bn(name, t):
        if not norm:
            return t
        return F.batch_norm(t, state[f"{p}{name}.running_mean"], state[f"{p}{name}.running_var"],
                            state[f"{p}{name}.weight"], state[f"{p}{name}.bias"], False, 0.0, 1e-5)

    def act(t):
        return F.leaky_relu(t, slope) if slope else F.relu(t)

    out = F.conv2d(x, state[f"{p}conv1.weight"], state[f"{p}conv1.bias"], 1, 1)
    for layer in (1, 2, 3):
        i = 0
        while f"{p}layer{layer}.{i}.conv1.weight" in state:
            b = f"{p}layer{layer}.{i}"
            stride = 2 if layer > 1 and i == 0 else 1
            h = F.conv2d(act(bn(f"layer{layer}.{i}.bn1", out)), state[f"{b}.conv1.weight"], state[f"{b}.conv1.bias"],
                         1, 1)
            h = F.conv2d(act(bn(f"layer{layer}.{i}.bn2", h)), state[f"{b}.conv2.weight"], state[f"{b}.conv2.bias"],
                         stride, 1)
            short = (F.conv2d(out, state[f"{b}.shortcut.0.weight"], state[f"{b}.shortcut.0.bias"], stride)
                     if f"{b}.shortcut.0.weight" in state else out)
            out, i = h + short, i + 1
    out = act(bn("bn1", out))
    return F.avg_pool2d(out, 8).flatten(1)


def ref_ss_logits(state, x):
    return F.linear(ref_wrn_features(state, x), state["linear.weight"], state["linear.bias"])


def ref_jem(state, x):
    logits = F.linear(ref_wrn_features(state, x, "f.", norm=False, slope=0.2), state["class_output.weight"],
                      state["class_output.bias"])
    return -logits.logsumexp(1), logits


def images(n=3, seed=1):
    """Float64 images: parity is checked in float64 (precision: float64), where 1e-6 leaves no room for a wrong
    network and float32 rounding (about 1e-5 through a WRN) none for a false alarm."""
    return (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1).double()


def dbl(state):
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def close(a, b):
    assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
    return torch.allclose(a, b, atol=1e-6, rtol=0)


def attack_cfg(tmp_path, **tree):
    base = {"data": {"path": TEST_EXACT, "count": 2}, "output": str(tmp_path / "out"), "mlflow": {"enabled": False},
            "precision": "float64",
            "purify": {"steps": 2}, "attack": {"mode": "defense", "eot_attack": 2, "eot_defense": 2}}
    for k, v in tree.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    from distributed_ebm.config import build
    return build(AttackConfig, base)


# ---- each format, through the attack config's path ----

def test_stochastic_security_ebm_and_classifier_legacy_files(tmp_path):
    ebm_state, clf_state = ss_ebm_state(), wrn_state(depth=10, widen=2)
    ebm_url, clf_url = save_legacy(ebm_state, tmp_path / "ebm.pth"), save_legacy(clf_state, tmp_path / "clf.pth")
    cfg = attack_cfg(tmp_path, ebm=ebm_url, ebm_format="stochastic_security",
                     classifier={"arch": "wrn28_10_ss", "format": "stochastic_security", "weights": clf_url})
    attack = build_attack(cfg)
    x = images()
    with torch.no_grad():
        assert close(attack.defense.purifier.ebm(x), ref_conv_ebm(dbl(ebm_state), x, lambda t: F.leaky_relu(t, 0.05)))
        assert close(attack.defense.classifier(x), ref_ss_logits(dbl(clf_state), x))
    assert attack.defense.purifier.ebm.activation == "lrelu"


def test_the_authors_wrn28_10_is_theirs_and_ours_stays_bias_free(tmp_path):
    state = wrn_state(depth=28, widen=10)
    assert len(state) == 183
    url = save_legacy(state, tmp_path / "clf.pth")
    clf = load_classifier("wrn28_10_ss", url).double()  # the bare state dict loads as the arch, as any classifier's
    x = images(2)
    with torch.no_grad():
        assert close(clf(x), ref_ss_logits(dbl(state), x))
    with pytest.raises(InputError, match="does not fit architecture 'wrn28_10'"):
        load_classifier("wrn28_10", url)


def test_mefa_ebm_needs_its_activation_named(tmp_path):
    state = ss_ebm_state(seed=3)
    url = str(tmp_path / "mefa.pth")
    torch.save(state, url)
    x = images()
    for activation, act in (("soft_lrelu", soft_lrelu), ("silu", lambda t: t * torch.sigmoid(t))):
        cfg = attack_cfg(tmp_path, ebm=url, ebm_format="mefa", ebm_net={"activation": activation})
        ebm = build_attack(cfg).defense.purifier.ebm
        with torch.no_grad():
            assert close(ebm(x), ref_conv_ebm(dbl(state), x, act))
    with pytest.raises(ValueError, match="ebm_format=mefa: set ebm_net.activation to soft_lrelu or silu"):
        attack_cfg(tmp_path, ebm=url, ebm_format="mefa")
    with pytest.raises(InputError, match="ebm_format=mefa: set ebm_net.activation"):
        load_ebm(url, "mefa")


def test_jem_energy_and_classifier(tmp_path):
    obj = jem_file(seed=5)
    url = str(tmp_path / "jem.pt")
    torch.save(obj, url)
    cfg = attack_cfg(tmp_path, ebm=url, classifier={"format": "jem", "weights": url})  # ebm_format auto: jem
    attack = build_attack(cfg)
    x = images()
    energy, logits = ref_jem(dbl(obj["model_state_dict"]), x)
    with torch.no_grad():
        assert close(attack.defense.purifier.ebm(x), energy)
        assert close(attack.defense.classifier(x), logits)


def test_jem_builds_the_real_28_10_from_its_keys(tmp_path):
    obj = jem_file(depth=28, widen=10, seed=2)
    url = str(tmp_path / "jem.pt")
    torch.save(obj, url)
    ebm = load_ebm(url, "jem")  # every key and shape fitted strictly; the forward is checked on the narrow one
    assert (ebm.f.depth, ebm.f.widen) == (28, 10)
    assert sum(p.numel() for p in ebm.parameters()) == sum(v.numel() for v in obj["model_state_dict"].values())


class _Net(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, 2, 1)
        self.fc = torch.nn.Linear(4 * 16 * 16, out)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _export(net, url):
    x = images(2).float()
    program = torch.export.export(net.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, url)


def test_torch_export_programs_as_classifier_and_ebm(tmp_path):
    torch.manual_seed(0)
    clf, energy = _Net(10), _Net(1)
    clf_url, ebm_url = str(tmp_path / "clf.pt2"), str(tmp_path / "ebm.pt2")
    _export(clf, clf_url)
    _export(energy, ebm_url)
    cfg = attack_cfg(tmp_path, ebm=ebm_url, classifier={"weights": clf_url, "mean": [0, 0, 0], "std": [1, 1, 1]})
    attack = build_attack(cfg)  # formats auto: the programs say what they are
    x = images(5)
    with torch.no_grad():
        assert close(attack.defense.purifier.ebm(x), energy.double()(x).flatten())
        assert close(attack.defense.classifier(x), clf.double()((x + 1) / 2))  # a network exported on [0, 1] pixels
    xg = x.clone().requires_grad_(True)  # the purifier differentiates it
    (g,) = torch.autograd.grad(attack.defense.purifier.ebm(xg).sum(), xg)
    assert g.abs().sum() > 0


# ---- debm import ----

@pytest.mark.parametrize("kind", ["ss_ebm", "ss_clf", "mefa", "jem"])
def test_debm_import_round_trip(tmp_path, capsys, kind):
    x = images()
    if kind == "ss_ebm":
        state = ss_ebm_state(seed=7)
        src, args = save_legacy(state, tmp_path / "ebm.pth"), ["--format", "stochastic_security"]
        want = ref_conv_ebm(dbl(state), x, lambda t: F.leaky_relu(t, 0.05))
    elif kind == "ss_clf":
        state = wrn_state(seed=7)
        src, args = save_legacy(state, tmp_path / "clf.pth"), ["--format", "stochastic_security"]
        want = ref_ss_logits(dbl(state), x)
    elif kind == "mefa":
        state = ss_ebm_state(seed=8)
        src, args = str(tmp_path / "mefa.pth"), ["--format", "mefa", "--activation", "soft_lrelu"]
        torch.save(state, src)
        want = ref_conv_ebm(dbl(state), x, soft_lrelu)
    else:
        obj = jem_file(seed=9)
        src, args = str(tmp_path / "jem.pt"), ["--format", "jem"]
        torch.save(obj, src)
        want = ref_jem(dbl(obj["model_state_dict"]), x)[0]
    out = str(tmp_path / "imported" / "model.pt")
    assert main(["import", src, *args, "--out", out]) == 0
    assert out in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    sha = hashlib.sha256(storage.read_bytes(src)).hexdigest()
    assert ckpt["source"] == {"url": src, "sha256": sha, "format": args[1]}
    card = storage.read_bytes(out + ".md").decode()
    assert sha in card and args[1] in card
    with torch.no_grad():
        if kind == "ss_clf":
            clf = load_classifier(ckpt["arch"], out, wrn_depth=ckpt["wrn_depth"], wrn_widen=ckpt["wrn_widen"])
            got = clf.double()(x)
        else:
            got = load_ebm(out, "auto").double()(x)  # auto: this project's checkpoint
            if kind != "jem":
                assert torch.equal(load_ebm(out).double()(x), got)  # the plain loader reads it too
    assert close(got, want)
    if kind == "mefa":
        assert ckpt["activation"]["name"] == "soft_lrelu"


# ---- refusals: one line naming the field ----

def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line(tmp_path, capsys):
    url = save_legacy(ss_ebm_state(), tmp_path / "ebm.pth")
    with pytest.raises(InputError) as err:
        load_ebm(url, "auto")
    assert "ebm_format=auto" in _one_line(err) and "stochastic_security" in str(err.value) and "mefa" in str(err.value)
    evil = tmp_path / "evil.pth"
    torch.save({"f": torch.nn.Linear(2, 2)}, str(evil), _use_new_zipfile_serialization=False)
    for fmt in ("auto", "stochastic_security"):
        with pytest.raises(InputError) as err:
            load_ebm(str(evil), fmt)
        assert "cannot be read" in _one_line(err) and "never unpickled" in str(err.value)
    wrong = ss_ebm_state()
    wrong["f.10.weight"] = torch.zeros(1)
    torch.save(wrong, str(tmp_path / "wrong.pth"))
    with pytest.raises(InputError) as err:
        load_ebm(str(tmp_path / "wrong.pth"), "stochastic_security")
    assert "does not fit format stochastic_security" in _one_line(err) and "f.10.weight" in str(err.value)
    with pytest.raises(InputError) as err:
        load_ebm(url, "jem")
    assert "JEM checkpoint" in _one_line(err)
    with pytest.raises(ValueError, match="classifier.format=stochastic_security holds the authors' WRN"):
        attack_cfg(tmp_path, ebm=url, classifier={"format": "stochastic_security", "arch": "wrn28_10"})
    assert main(["import", url, "--format", "mefa", "--out", str(tmp_path / "x.pt")]) == 2
    err_text = capsys.readouterr().err.strip()
    assert "\n" not in err_text and "--activation" in err_text


def test_the_format_table_is_the_docs_table():
    with open("docs/models.md") as f:
        assert format_table() in f.read()


# ---- each paper's protocol, tiny, end to end ----

def _paper_files(tmp_path, paper):
    if paper == "stochastic_security":
        ebm = save_legacy(ss_ebm_state(scale=20), tmp_path / "ebm.pth")
        return {"ebm": ebm, "classifier.weights": save_legacy(wrn_state(), tmp_path / "clf.pth")}
    if paper == "mefa":
        torch.save(ss_ebm_state(scale=20), str(tmp_path / "ebm.pth"))
        torch.save(wrn_state(), str(tmp_path / "clf.pth"))
        return {"ebm": str(tmp_path / "ebm.pth"), "classifier.weights": str(tmp_path / "clf.pth")}
    torch.save(jem_file(), str(tmp_path / "jem.pt"))
    return {"ebm": str(tmp_path / "jem.pt"), "classifier.weights": str(tmp_path / "jem.pt")}


@pytest.mark.parametrize("paper", ["stochastic_security", "mefa", "jem"])
def test_each_papers_protocol_runs_tiny(tmp_path, paper):
    files = _paper_files(tmp_path, paper)
    out = str(tmp_path / "out")
    overrides = [f"{k}={v}" for k, v in files.items()] + [
        f"data.path={TEST_EXACT}", "data.random=2" if paper == "stochastic_security" else "data.count=2",
        "purify.steps=3", "attack.steps=2", "attack.eot_attack=2", "attack.eot_defense=2", "batch_size=2",
        f"output={out}", "mlflow.enabled=false", "report.gallery=0"]
    if paper == "mefa":
        overrides.append("attack.reevaluations=1")
    cfg = load_config(AttackConfig, f"{PAPERS}/{paper}.yaml", overrides)
    summary = run_attack(cfg, OneProcess("cpu"), show=False)
    assert summary["images"] == 2
    saved = json.loads(storage.read_bytes(out + "/summary.json"))["config"]
    assert saved["ebm_format"] == {"stochastic_security": "stochastic_security", "mefa": "mefa", "jem": "jem"}[paper]


# ---- the purifier's initial kick (MEFA's and JEM's chains) ----

def test_the_initial_kick_is_keyed_and_the_exact_gradient_repeats_it():
    from distributed_ebm.method.defense import KICK_STEP, EOTDefense, Purifier
    from distributed_ebm.method.nets import EBM, build_classifier
    from distributed_ebm.method.noise import ChainKeys

    torch.manual_seed(0)
    x, ids = images(2).float(), torch.tensor([3, 5])
    keys = ChainKeys.replicated(0, ids, 1)
    kicked = Purifier(EBM(width=4), steps=0, noise=0.0, init_noise=0.1)
    assert torch.equal(kicked(x, keys), x + 0.1 * keys.normal(KICK_STEP, (32, 32, 3)).permute(0, 3, 1, 2))
    assert torch.equal(Purifier(EBM(width=4), steps=0, noise=0.0)(x, keys), x)  # init_noise 0: no kick
    assert abs((kicked(x, keys) - x).std().item() - 0.1) < 0.005
    # With no Langevin step the purifier is the kick alone: the exact gradient (recomputing the chain from x) and
    # BPDA's (the classifier's gradient at the purified point) agree only if both paths apply the same kick.
    clf = build_classifier("wrn", wrn_depth=10, wrn_widen=1).eval()
    defense = EOTDefense(clf, kicked)
    labels = torch.tensor([1, 2])
    _, bpda = defense.logits_and_grad(x, labels, ids, seed=0, call=0, replicates=2)
    _, exact = defense.logits_and_grad(x, labels, ids, seed=0, call=0, replicates=2, exact=True)
    _, unkicked = EOTDefense(clf, Purifier(EBM(width=4), steps=0, noise=0.0)).logits_and_grad(
        x, labels, ids, seed=0, call=0, replicates=2, exact=True)
    assert torch.allclose(exact, bpda, atol=1e-6) and not torch.allclose(exact, unkicked, atol=1e-4)


@pytest.mark.parametrize("paper", ["stochastic_security", "mefa", "jem"])
def test_debm_attack_runs_each_papers_protocol_on_ray(ray_local, tmp_path, paper):
    """The issue's "done when": `debm attack` with each paper's config and the released files in their layouts,
    purified and attacked on the Ray actors."""
    files = _paper_files(tmp_path, paper)
    out = str(tmp_path / paper)
    assert main(["attack", "--config", f"{PAPERS}/{paper}.yaml", *[f"{k}={v}" for k, v in files.items()],
                 f"data.path={TEST_EXACT}", "data.random=2" if paper == "stochastic_security" else "data.count=2",
                 "purify.steps=2", "attack.steps=1",
                 "attack.eot_attack=2", "attack.eot_defense=2", "batch_size=1", f"output={out}",
                 "mlflow.enabled=false", "ray.gpus_per_actor=0", "report.gallery=0"]) == 0
    summary = json.loads(storage.read_bytes(out + "/summary.json"))
    assert summary["images"] == 2 and summary["image_steps"] > 0
    assert summary["config"]["ebm_format"] == paper
    assert summary["config"]["classifier"]["format"] == {"mefa": "stochastic_security"}.get(paper, paper)


def test_an_activation_named_for_another_network_is_refused(tmp_path):
    url = str(tmp_path / "jem.pt")
    torch.save(jem_file(), url)
    with pytest.raises(InputError) as err:
        load_ebm(url, "auto", activation="soft_lrelu")
    assert "ebm_net.activation=soft_lrelu" in _one_line(err) and "jem" in str(err.value)


def test_training_fine_tunes_a_released_ebm_from_its_own_file(tmp_path, exact_test):
    """train-ebm's init_ebm: iteration 0 starts from the released weights (not the seed's), in every format of the
    convnet; a width that does not fit, another network (JEM) or MEFA's file without its activation: one line."""
    from distributed_ebm.config import TrainEBMConfig, build
    from distributed_ebm.errors import InputError
    from distributed_ebm.local.train import LocalTraining
    from distributed_ebm.recipes.training import initial_ebm
    from distributed_ebm.store.data import subset

    state = ss_ebm_state(width=4)
    url = save_legacy(state, tmp_path / "ebm.pth")
    tree = {"ebm": {"width": 4}, "langevin": {"steps": 2}, "iterations": 2, "batch_size": 8, "bank_size": 16,
            "checkpoint_every": 2, "init_ebm": url, "init_ebm_format": "stochastic_security",
            "output": str(tmp_path / "run")}
    cfg = build(TrainEBMConfig, tree)
    ours = {f"net.{k[2:]}": v for k, v in state.items()}  # their f.i is our net.i
    start = initial_ebm(cfg)
    for k, v in ours.items():
        assert torch.equal(start.state_dict()[k], v), k
    run = LocalTraining(cfg, subset(exact_test, count=16))
    assert torch.equal(run.ebm.state_dict()["net.0.weight"], ours["net.0.weight"])
    run.step()
    assert not torch.equal(run.ebm.state_dict()["net.0.weight"], ours["net.0.weight"])  # and it trains from there
    with pytest.raises(InputError, match=r"init_ebm .* does not fit ebm \(width 8\): size mismatch for net\.0\.weight"):
        initial_ebm(build(TrainEBMConfig, {**tree, "ebm": {"width": 8}}))
    with pytest.raises(InputError, match="ebm_format=mefa: set ebm_net.activation"):
        initial_ebm(build(TrainEBMConfig, {**tree, "init_ebm_format": "mefa"}))  # ebm.activation: lrelu
    with pytest.raises(InputError, match=r"has activation lrelu \(slope=0.05\), the config asks for silu"):
        initial_ebm(build(TrainEBMConfig, {**tree, "ebm": {"width": 4, "activation": "silu"}}))
    mefa = build(TrainEBMConfig, {**tree, "init_ebm_format": "mefa", "ebm": {"width": 4, "activation": "soft_lrelu"}})
    assert torch.equal(initial_ebm(mefa).state_dict()["net.8.weight"], ours["net.8.weight"])
    torch.save(jem_file(), str(tmp_path / "jem.pt"))
    with pytest.raises(InputError, match="holds another network than the convnet EBM"):
        initial_ebm(build(TrainEBMConfig, {**tree, "init_ebm": str(tmp_path / "jem.pt"), "init_ebm_format": "jem"}))
    with pytest.raises(InputError, match="holds another network than the convnet EBM"):
        initial_ebm(build(TrainEBMConfig, {**tree, "init_ebm": str(tmp_path / "jem.pt"), "init_ebm_format": "auto"}))
