"""MLP heads from config and the backbone + head classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kit.models.backbones import create_backbone
from kit.models.heads import PatchClassifier, Standardize, create_head
from kit.utils import KitError


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_shapes_and_layer_count_for_each_depth(depth):
    head = create_head(48, 4, depth=depth, width=32, dropout=0.0)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1
    assert linears[0].in_features == 48 and linears[-1].out_features == 4
    assert all(lin.out_features == 32 for lin in linears[:-1])
    assert head(torch.randn(5, 48)).shape == (5, 4)


def test_depth_zero_is_a_linear_classifier_with_input_dropout():
    head = create_head(10, 3, depth=0, dropout=0.2, standardize=False)
    assert [type(m) for m in head] == [nn.Dropout, nn.Linear]
    assert [type(m) for m in create_head(10, 3, depth=0, dropout=0.0)] == [Standardize, nn.Linear]


@pytest.mark.parametrize("activation,cls",
                         [("relu", nn.ReLU), ("gelu", nn.GELU), ("GELU", nn.GELU)])
def test_activation(activation, cls):
    head = create_head(8, 2, depth=3, width=4, activation=activation)
    acts = [m for m in head if isinstance(m, (nn.ReLU, nn.GELU))]
    assert len(acts) == 3 and all(type(a) is cls for a in acts)


@pytest.mark.parametrize("norm,cls", [("layernorm", nn.LayerNorm), ("batchnorm", nn.BatchNorm1d)])
def test_norm_layers_follow_each_hidden_linear(norm, cls):
    head = create_head(8, 2, depth=2, width=6, norm=norm, dropout=0.0, standardize=False)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, cls, nn.ReLU, nn.Linear, cls, nn.ReLU, nn.Linear]
    assert all(m.normalized_shape == (6,) if cls is nn.LayerNorm else m.num_features == 6
               for m in head if isinstance(m, cls))
    head.train()
    assert head(torch.randn(4, 8)).shape == (4, 2)


@pytest.mark.parametrize("norm", ["none", None])
def test_no_norm(norm):
    head = create_head(8, 2, depth=2, norm=norm)
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) for m in head.modules())


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    head = create_head(16, 4, depth=2, width=64, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in head) == 2
    x = torch.randn(8, 16)
    head.train()
    assert not torch.equal(head(x), head(x))
    head.eval()
    assert torch.equal(head(x), head(x))
    assert not any(isinstance(m, nn.Dropout) for m in create_head(16, 4, depth=2, dropout=0.0))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(depth=5), "depth"),
    (dict(depth=-1), "depth"),
    (dict(depth=1.5), "depth"),
    (dict(width=0), "width"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout="0.3"), "dropout"),
    (dict(activation="tanh"), "activation"),
    (dict(norm="groupnorm"), "norm"),
    (dict(in_features=0), "in_features"),
    (dict(num_classes=True), "num_classes"),
])
def test_bad_arguments(kwargs, fragment):
    args = dict(in_features=8, num_classes=4) | kwargs
    with pytest.raises(KitError, match=fragment):
        create_head(**args)


def test_bad_arguments_are_reported_together():
    with pytest.raises(KitError, match="head config: depth must .*; activation must") as err:
        create_head(8, 4, depth=9, activation="tanh")
    assert len(err.value.problems) == 2


def test_patch_classifier_maps_patches_to_logits():
    torch.manual_seed(0)
    backbone = create_backbone("tiny_cnn", weights="random", patch_size=32)
    model = PatchClassifier(backbone, create_head(backbone.num_features, 4, depth=1, width=8))
    x = torch.randn(3, 3, 32, 32)
    assert model.features(x).shape == (3, backbone.num_features)
    logits = model(x)
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert model.head[1].weight.grad is not None and backbone.blocks()[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(model.features(x)))


def test_standardize_scales_tiny_features_and_leaves_dead_dimensions_alone():
    torch.manual_seed(0)
    x = torch.randn(500, 3) * torch.tensor([3e-5, 10.0, 0.0]) + torch.tensor([1e-4, -5.0, 2.0])
    std = Standardize(3)
    assert not bool(std.fitted)
    z = std.fit(x)(x)
    assert bool(std.fitted)
    torch.testing.assert_close(z[:, :2].mean(0), torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(z[:, :2].std(0), torch.ones(2), atol=1e-3, rtol=0)
    assert torch.all(z[:, 2] == 0)  # a constant dimension: centred, never divided by ~0
    assert set(dict(std.named_buffers())) == {"mean", "std", "fitted"}  # saved in checkpoints
    with pytest.raises(KitError, match="at least 2"):
        Standardize(3).fit(x[:1])


def test_attention_mil_pools_an_images_patches_into_one_prediction():
    from kit.models.heads import AttentionMIL, is_mil

    torch.manual_seed(0)
    head = create_head(12, 4, depth=1, width=16, dropout=0.0, pool="attention")
    assert isinstance(head, AttentionMIL) and is_mil(head)
    assert not is_mil(create_head(12, 4))
    x = torch.randn(5, 7, 12)
    head.eval()
    logits = head(x)
    assert logits.shape == (5, 4)
    w = head.attention(x)
    assert w.shape == (5, 7)
    torch.testing.assert_close(w.sum(1), torch.ones(5))
    perm = torch.randperm(7)  # a bag: the order of the patches does not matter
    torch.testing.assert_close(head(x[:, perm]), logits)
    with pytest.raises(KitError, match="B x K x D"):
        head(torch.randn(5, 12))
    with pytest.raises(KitError, match="pool"):
        create_head(12, 4, pool="max")
