"""The ``--weights`` lookup (kit.models.weights): auto from $KIT_WEIGHTS_DIR or the caches, a
file or a folder, and the one offline message; exercised through ``create_backbone``."""
from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

import test_backbones
from kit.models import backbones as B
from kit.models.backbones import create_backbone
from kit.utils import KitError
from test_backbones import RESNETS, TIMM_VITS, _fake_hf_cache, _same_weights, _tiny_vit_model

# test_backbones' autouse fixtures, bound here so that they apply to this file too: empty
# caches, HF_HUB_OFFLINE=1, one intra-op thread.
backbones_offline = test_backbones.backbones_offline
backbones_one_thread = test_backbones.backbones_one_thread


# --------------------------------------------------------------------------- auto
def test_phikon_auto_uses_kit_weights_dir(backbones_offline):
    vit = _tiny_vit_model(seed=1)
    vit.save_pretrained(backbones_offline / "weights" / "phikon")
    bb = create_backbone("phikon")  # weights="auto"
    assert bb.weights_source.startswith("local:") and bb.weights_source.endswith("phikon")
    assert _same_weights(bb.model, vit)


def test_phikon_auto_uses_the_hf_cache(backbones_offline, tmp_path):
    vit = _tiny_vit_model(seed=2)
    vit.save_pretrained(tmp_path / "src")
    _fake_hf_cache(backbones_offline, "owkin/phikon",
                   {f: tmp_path / "src" / f for f in ("config.json", "model.safetensors")})
    bb = create_backbone("phikon")
    assert bb.weights_source == "hf-cache:owkin/phikon"
    assert _same_weights(bb.model, vit)


# ------------------------------------------------------------------- a file, a folder, the caches
def test_timm_weights_from_file_folder_and_cache(backbones_offline, tmp_path):
    import timm

    torch.manual_seed(5)
    src = timm.create_model("efficientnet_b0", pretrained=False)  # with its 1000-class classifier
    save_file(src.state_dict(), str(tmp_path / "eff.safetensors"))
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}

    bb = create_backbone("efficientnet_b0", weights=tmp_path / "eff.safetensors")
    assert bb.weights_source == f"local:{tmp_path / 'eff.safetensors'}"
    assert bb.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in expected.items())

    _fake_hf_cache(backbones_offline, "timm/efficientnet_b0.ra_in1k",
                   {"model.safetensors": tmp_path / "eff.safetensors"})
    bb = create_backbone("efficientnet_b0")
    assert bb.weights_source == "hf-cache:timm/efficientnet_b0.ra_in1k"
    assert torch.equal(bb.model.conv_stem.weight, src.conv_stem.weight)

    with pytest.raises(KitError, match="do not fit"):
        create_backbone("efficientnet_b0", weights=_tiny_cnn_file(tmp_path))


def test_resnet_takes_torchvisions_imagenet_file_from_the_torch_cache(backbones_offline):
    """resnet18.tv_in1k is torchvision's file: found under its own name in torch's hub cache
    (where torchvision.models.resnet18(weights=...) leaves it), 1000-class fc dropped."""
    import timm

    cfg = timm.models.get_pretrained_cfg("resnet18.tv_in1k")
    assert cfg.url.endswith("/resnet18-f37072fd.pth") and cfg.hf_hub_id == "timm/resnet18.tv_in1k"
    torch.manual_seed(3)
    src = timm.create_model("resnet18", pretrained=False)  # torchvision's keys, fc included
    cache = backbones_offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(src.state_dict(), cache / "resnet18-f37072fd.pth")
    bb = create_backbone("resnet18", patch_size=64)
    assert bb.weights_source == f"timm-cache:{cache / 'resnet18-f37072fd.pth'}"
    expected = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in expected.items())
    assert bb.model.state_dict().keys() == expected.keys()
    # resnet50's file is not resnet18's: refused, never half-random
    with pytest.raises(KitError, match="do not fit"):
        create_backbone("resnet50", weights=cache / "resnet18-f37072fd.pth")


def _tiny_cnn_file(tmp_path):
    path = tmp_path / "tiny" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    torch.manual_seed(7)
    save_file(create_backbone("tiny_cnn", weights="random").state_dict(), str(path))
    return path.parent


def test_tiny_cnn_loads_its_own_state_dict(tmp_path):
    folder = _tiny_cnn_file(tmp_path)
    torch.manual_seed(7)
    ref = create_backbone("tiny_cnn", weights="random")
    bb = create_backbone("tiny_cnn", weights=folder)
    assert _same_weights(bb, ref) and bb.weights_source.startswith("local:")
    torch.save(ref.state_dict(), tmp_path / "tiny.pth")
    assert _same_weights(create_backbone("tiny_cnn", weights=tmp_path / "tiny.pth"), ref)
    auto = create_backbone("tiny_cnn")
    assert "no pretrained weights" in auto.weights_source
    (tmp_path / "empty").mkdir()
    with pytest.raises(KitError, match="no weight file"):
        create_backbone("tiny_cnn", weights=tmp_path / "empty")


@pytest.mark.parametrize("name", ["phikon", "efficientnet_b0", "convnext_tiny", "phikon_v2",
                                  "midnight", *RESNETS, *TIMM_VITS])
def test_offline_without_weights_is_one_clear_error(backbones_offline, name):
    start = time.monotonic()
    with pytest.raises(KitError, match="no pretrained weights found: looked in") as err:
        create_backbone(name)  # weights="auto", nothing anywhere, HF_HUB_OFFLINE=1
    assert time.monotonic() - start < 10  # no network wait
    msg = str(err.value)
    assert str(backbones_offline / "weights" / name) in msg  # the local dir
    assert str(backbones_offline / "hf" / "hub") in msg  # the HF cache
    assert "HF_HUB_OFFLINE" in msg and "hf download" in msg and "--weights" in msg
    assert "\n" not in msg
    if name in ("efficientnet_b0", *RESNETS):  # also a torch-hub URL (convnext_tiny: HF hub only)
        assert str(backbones_offline / "torch" / "hub" / "checkpoints") in msg
    spec = B.FOUNDATION_MODELS.get(name)
    if spec is not None:
        assert f"hf download {spec.repo} --local-dir {name}" in msg
    if spec is not None and spec.gated:  # how to get access: accept the licence, log in
        assert f"{spec.repo} is gated" in msg and f"https://huggingface.co/{spec.repo}" in msg
        assert "accept its licence" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    else:
        assert "gated" not in msg
