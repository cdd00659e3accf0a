"""The backbones a user expects: torchvision ResNets (and PatchCore's Wide ResNet-50-2) fetched into
torchvision's cache when online, any timm model by name, a local weights file, and one clear line
on an air-gapped machine. Nothing here downloads: the download itself is replaced."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from defect_detection.base import UserError
from defect_detection.models.backbones import build_network
from defect_detection.models.features import FeatureExtractor
from tests.conftest import compose_train


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_offline_or_download_off_names_the_file_to_place(empty_cache, monkeypatch):
    with pytest.raises(UserError, match=r"No ImageNet weights for resnet18 .*downloads are off "
                                        r"\(backbone.download=false\).*put resnet18-f37072fd.pth there"):
        build_network("resnet18", pretrained=True, download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"the download from https://download.pytorch.org/models/"
                                        r"resnet18-f37072fd.pth failed \(URLError"):
        build_network("resnet18", pretrained=True)
    assert not empty_cache.exists() or not list(empty_cache.glob("*.pth"))  # nothing half-written left


def test_online_the_weights_arrive_in_torchvisions_own_cache(empty_cache, monkeypatch):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).state_dict()
    asked = []

    def fetched(url, model_dir, file_name, **kwargs):  # what torchvision's download leaves behind
        asked.append(url)
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        torch.save(reference, Path(model_dir) / file_name)
        return reference

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetched)
    net = build_network("resnet18", pretrained=True)
    assert asked == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert (empty_cache / "resnet18-f37072fd.pth").is_file()
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    build_network("resnet18", pretrained=True)  # the cached file now: no second download
    assert len(asked) == 1


def test_a_local_weights_file_and_any_timm_model(tmp_path):
    import timm

    source = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    net = build_network("resnet10t", pretrained=True, weights_path=str(path))
    assert net.get_classifier().out_features == 2  # a fresh two-class head
    assert torch.equal(net.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    with pytest.raises(UserError, match="backbone resnet10t: no weights_path and downloads are off"):
        build_network("resnet10t", pretrained=True, download=False)
    with pytest.raises(UserError, match="Unknown backbone 'not_a_net'.*or any timm model name"):
        build_network("not_a_net")
    features = FeatureExtractor("resnet10t", [8, 16], pretrained=True, weights_path=str(path))
    maps = features(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4)] and len(features.channels) == 2


def test_patchcore_as_published_is_one_word_away():
    cfg = compose_train(Path("/tmp/unused"), "experiment=patchcore_wrn50", "backbone.pretrained=false")
    assert (cfg.detector.name, cfg.backbone.name, list(cfg.detector.strides)) == (
        "patchcore", "wide_resnet50_2", [8, 16])
    features = FeatureExtractor("wide_resnet50_2", [8, 16], pretrained=False)
    assert features.channels == [512, 1024]  # layer2 + layer3
