import numpy as np
import pytest
import torch
from torch import nn

from fedmed import config as config_mod
from fedmed.config import ModelConfig, TrainConfig
from fedmed.data import demo
from fedmed.data.sites import to_tensor
from fedmed.models import SmallCNN, build_model
from fedmed.training.loop import evaluate, train
from fedmed.training.metrics import classification_metrics, from_confusion


def test_default_cnn_is_small_and_has_no_batchnorm():
    model = build_model(ModelConfig(), 4, seed=0)
    assert isinstance(model, SmallCNN)
    assert 30_000 < sum(p.numel() for p in model.parameters()) < 300_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_resnet18_option_takes_one_channel_and_has_no_batchnorm():
    model = build_model(ModelConfig(name="resnet18"), 4, seed=0)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_same_seed_same_initial_weights():
    a, b = build_model(ModelConfig(), 4, seed=1), build_model(ModelConfig(), 4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_hospitals_training_lowers_the_loss():
    spec = demo.DemoSpec(seed=0, image_size=32, hospitals=1, train_per_hospital=64, test_per_hospital=4, global_test_size=4)
    data = demo.generate(spec, workers=1).select("train", 0)
    x, y = to_tensor(data.images), torch.from_numpy(data.labels)
    model = build_model(ModelConfig(width=16), 4, seed=0)
    before = evaluate(model, x, y)["loss"]
    train(model, x, y, TrainConfig(batch_size=16), seed=0, epochs=8)
    after = evaluate(model, x, y)["loss"]
    assert after < 0.8 * before


def test_training_is_reproducible_for_a_seed():
    x, y = torch.rand(32, 1, 32, 32), torch.arange(32) % 4
    states = []
    for _ in range(2):
        model = build_model(ModelConfig(width=8), 4, seed=0)
        train(model, x, y, TrainConfig(batch_size=8), seed=3, epochs=2)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 3])
    probs = np.eye(4)[[0, 1, 1, 1, 2, 2]] * 0.7 + 0.075
    m = classification_metrics(y, probs)
    assert m["accuracy"] == 4 / 6
    assert m["per_class_recall"] == [0.5, 1.0, 1.0, 0.0]
    assert m["confusion"][0] == [1, 1, 0, 0]
    # one-vs-rest, ties counting half: class 0: 6/8, class 1: 7/8, class 2: 4.5/5, class 3: 2.5/5
    assert m["auroc"] == pytest.approx((0.75 + 0.875 + 0.9 + 0.5) / 4)
    pooled = from_confusion(np.array(m["confusion"]))
    assert pooled["accuracy"] == m["accuracy"]
    assert abs(pooled["macro_f1"] - m["macro_f1"]) < 1e-12


def test_the_proximal_term_changes_the_update_and_holds_weights_near_the_start():
    from fedmed.models import build_model
    from fedmed.training.loop import train

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 32, 32), torch.randint(0, 4, (32,))
    cfg = config_mod.load(None, ["train.batch_size=8", "train.lr=0.01"])
    start = build_model(cfg.model, 4, seed=0)
    initial = torch.cat([p.detach().flatten() for p in start.parameters()])

    def moved(mu: float) -> tuple[torch.Tensor, float]:
        model = build_model(cfg.model, 4, seed=0)
        train(model, x, y, cfg.train, seed=1, epochs=3, proximal_mu=mu)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return after, float((after - initial).norm())

    plain, plain_dist = moved(0.0)
    prox, prox_dist = moved(100.0)
    assert not torch.equal(plain, prox)
    assert prox_dist < plain_dist


def test_per_image_augmentation_depends_on_the_image_not_its_batch():
    from fedmed.training.augment import per_image

    transform = per_image(("rotate", "zoom", "intensity", "bias_field", "noise"), seed=7)
    x = torch.rand(6, 1, 32, 32)
    whole = transform(x, torch.arange(6), epoch=0)
    apart = torch.cat([transform(x[3:], torch.arange(3, 6), epoch=0), transform(x[:3], torch.arange(3), epoch=0)])
    assert torch.equal(whole, torch.cat([apart[3:], apart[:3]]))  # the same image, the same draw, in any batch
    assert not torch.equal(whole, transform(x, torch.arange(6), epoch=1))  # a new epoch, new draws
    assert not torch.equal(whole, x) and whole.min() >= 0 and whole.max() <= 1
    assert per_image(("flip",), seed=7) is None  # flip alone needs no per-image transform


def test_training_with_every_augmentation_lowers_the_loss():
    cfg = config_mod.load(None, ["train.augment='flip,rotate,zoom,intensity,bias_field,noise'", "train.batch_size=8", "model.width=4"])
    y = torch.arange(32) % 4
    x = 0.1 * torch.rand(32, 1, 32, 32) + 0.2 * y[:, None, None, None]  # brightness tells the class
    model = build_model(cfg.model, 4, seed=0)
    first = train(model, x, y, cfg.train, seed=0)
    last = train(model, x, y, cfg.train, seed=1, epochs=5)
    assert last.loss < first.loss
