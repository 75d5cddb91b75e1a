import pytest
import torch

from distributed_ebm.errors import InputError
from distributed_ebm.method.nets import EBM, build_classifier
from distributed_ebm.method.training import accuracy
from distributed_ebm.store.checkpoints import load_classifier, save_classifier, save_ebm
from distributed_ebm.store.released import load_ebm

from .conftest import WEIGHTS_DIR, tiny_ebm


def test_ebm_is_the_papers_network():
    ebm = EBM()
    assert sum(p.numel() for p in ebm.parameters()) == 693_569
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in ebm.modules())
    assert ebm(torch.zeros(5, 3, 32, 32)).shape == (5,)
    assert EBM(width=4, image_size=64)(torch.zeros(2, 3, 64, 64)).shape == (2,)


@pytest.mark.parametrize("arch, file, expected", [("resnet20", "resnet20-12fca82f.th", 0.915),
                                                  ("resnet56", "resnet56-4bfd9763.th", 0.926)])
def test_pretrained_resnets_score_as_published(exact_test, arch, file, expected):
    clf = load_classifier(arch, f"{WEIGHTS_DIR}/{file}")
    assert accuracy(clf, exact_test) == pytest.approx(expected, abs=0.003)


def test_wrong_architecture_says_so(tmp_path):
    with pytest.raises(InputError, match="does not fit architecture 'resnet32': 60 missing"):
        load_classifier("resnet32", f"{WEIGHTS_DIR}/resnet20-12fca82f.th")
    with pytest.raises(InputError,
                       match="does not fit architecture 'resnet56'.*unexpected|does not fit architecture 'resnet56'"):
        load_classifier("resnet56", f"{WEIGHTS_DIR}/resnet44-014dd654.th")
    wrn = build_classifier("wrn", wrn_depth=10, wrn_widen=1)
    save_classifier(wrn, str(tmp_path / "wrn.pt"))
    with pytest.raises(InputError, match="holds a 'wrn' classifier, not 'resnet20'"):
        load_classifier("resnet20", str(tmp_path / "wrn.pt"))
    with pytest.raises(InputError, match="not an EBM checkpoint"):
        load_ebm(f"{WEIGHTS_DIR}/resnet20-12fca82f.th")


def test_wide_resnet_28_10_shape():
    wrn = build_classifier("wrn28_10")
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194
    assert wrn.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_classifier_wrapper_normalizes_its_own_way():
    clf = build_classifier("resnet20")  # ImageNet mean/std on [0, 1] pixels
    seen = []
    clf.net.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    clf.eval()(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], ((x + 1) / 2 - mean) / std, atol=1e-6)


def test_checkpoints_round_trip(tmp_path):
    ebm = tiny_ebm()
    save_ebm(ebm, str(tmp_path / "e.pt"))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(load_ebm(str(tmp_path / "e.pt"))(x), ebm(x))
    with pytest.raises(InputError, match="is for 32x32 images, the data are 64x64"):
        load_ebm(str(tmp_path / "e.pt"), image_size=64)
    wrn = build_classifier("wrn", wrn_depth=10, wrn_widen=2).eval()
    save_classifier(wrn, str(tmp_path / "w.pt"))
    assert torch.equal(load_classifier("wrn", str(tmp_path / "w.pt"))(x.clamp(-1, 1)), wrn(x.clamp(-1, 1)))
