"""RevCol in Hugging Face transformers (docs/transformers.md): each recipe of that page, on a tiny configuration.

transformers reaches RevCol through its timm wrapper (``TimmBackbone``, which calls ``timm.create_model``). A parent
model (UperNet, RT-DETR, Mask2Former) builds its backbone from a ``TimmBackboneConfig`` alone, and transformers 5
hands it no timm keyword arguments, so the tiny configuration is a registered variant (``fake_revcol_hf``) with a
published ADE20K file in the authors' mmsegmentation layout, served from 127.0.0.1. Nothing here reaches the
internet. The recipes are the same on every supported transformers release (4.49 to 5.x).
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from helpers.models import TINY_CONFIG, make_net
from helpers.processes import revcol_env
from helpers.server import offline_weights
from transformers import (
    AutoBackbone,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    RTDetrConfig,
    RTDetrForObjectDetection,
    TimmBackbone,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

import revcol
from revcol import ConfigError, FullNet, RevColClassifier, VariantSpec, timm_models
from revcol.diagnostics import SavedTensors, randomize_
from revcol.weights.published import WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAKE = "fake_revcol_hf"  # outside the revcol* pattern, so listing the real variants is unaffected
FAKE_SPEC = VariantSpec(**TINY_CONFIG, drop_path=0.0)
ADE_ENTRY = PublishedWeights(
    FAKE, "in1k_ft_ade20k", "upernet_fake_revcol_hf_ade20k.pth", 64, None, None, False, "segmentation", "ADE20K"
)
NAME = f"{FAKE}.{ADE_ENTRY.tag}"  # what a user writes: "revcol_tiny.in1k_ft_ade20k"
SERVED = f"/weights/{ADE_ENTRY.filename}"
ALL_LEVELS = [0, 1, 2, 3]
# The features-only model keeps the classifier's LayerNorm (timm's pruning drops the Linear only): no map uses it.
UNUSED_HEAD_NORM = "cls.classifier.0."


@pytest.fixture(autouse=True)
def fake_variant(tmp_path, monkeypatch) -> None:
    """``fake_revcol_hf``: a tiny variant with one published (ADE20K) file, registered with timm as the page's
    "custom configuration" recipe does; weights offline."""
    offline_weights(tmp_path, monkeypatch)
    monkeypatch.setitem(revcol.VARIANTS, FAKE, FAKE_SPEC)
    monkeypatch.setitem(WEIGHTS, FAKE, {ADE_ENTRY.tag: ADE_ENTRY})
    # timm's register_model appends the name to the module's __all__: without these, the fake variant would stay
    # public in revcol.timm_models for every later test of this process (docs/api.md's check among them).
    monkeypatch.setattr(timm_models, "__all__", list(timm_models.__all__))
    monkeypatch.setattr(timm_models, "default_cfgs", dict(timm_models.default_cfgs))
    monkeypatch.setattr(timm_models, FAKE, None, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is registered again (an earlier test)
        timm_models.register(FAKE)


@pytest.fixture
def published(server, monkeypatch) -> dict[str, torch.Tensor]:
    """The ADE20K file of ``fake_revcol_hf`` on the local server (mmsegmentation's layout); its backbone tensors."""
    backbone = make_net(dtype=torch.float32, seed=8).state_dict()
    segmenter = {f"backbone.{k}": v for k, v in backbone.items()}
    segmenter["decode_head.conv_seg.weight"] = torch.randn(3, 8, 1, 1)
    buffer = io.BytesIO()
    torch.save({"meta": {"mmseg_version": "0.24.1"}, "state_dict": segmenter}, buffer)
    server.files[SERVED] = (buffer.getvalue(), "ok")
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    return backbone


def backbone_config(name: str = NAME, out_indices: list[int] = ALL_LEVELS) -> TimmBackboneConfig:
    # use_pretrained_backbone=False: transformers 4.x and 5.0 would otherwise download the file at every build
    return TimmBackboneConfig(backbone=name, out_indices=out_indices, use_pretrained_backbone=False)


def upernet() -> UperNetForSemanticSegmentation:
    config = UperNetConfig(
        backbone_config=backbone_config(),
        hidden_size=32,
        auxiliary_channels=16,
        auxiliary_in_channels=FAKE_SPEC.channels[2],  # transformers 4.x has no default from the backbone
        num_labels=5,
    )
    return UperNetForSemanticSegmentation(config)


def networks(model: torch.nn.Module) -> list[RevColClassifier]:
    return [m for m in model.modules() if isinstance(m, FullNet)]


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    (network,) = networks(model)
    return {k: v for k, v in network.state_dict().items() if not k.startswith(UNUSED_HEAD_NORM)}


def assert_backbone_trained(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """``loss`` is finite; backward reaches every backbone parameter; an AdamW step changes the backbone."""
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    (network,) = networks(model)
    missing = [n for n, p in network.named_parameters() if p.grad is None]
    assert missing == [f"{UNUSED_HEAD_NORM}weight", f"{UNUSED_HEAD_NORM}bias"]  # the page's "Limits"
    assert all(p.grad.abs().sum() > 0 for n, p in network.named_parameters() if n.startswith("stem."))
    before = network.stem[0].weight.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(before, network.stem[0].weight)


def assert_published_backbone(model: torch.nn.Module, published: dict[str, torch.Tensor]) -> None:
    state = backbone_state(model)
    assert set(state) == set(published)
    assert all(torch.equal(state[k], v) for k, v in published.items())


# --------------------------------------------------------------------------- 1. TimmBackbone / AutoBackbone


def test_autobackbone_at_an_odd_size_gives_the_floored_maps_of_the_network():
    config = backbone_config("revcol_tiny")
    backbone = AutoBackbone.from_config(config, **TINY_CONFIG).eval()  # keywords go to timm.create_model
    assert isinstance(backbone, TimmBackbone)
    assert backbone.channels == list(TINY_CONFIG["channels"])
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        hidden = backbone(x, output_hidden_states=True).hidden_states
        plain = FullNet(**TINY_CONFIG).eval()
        plain.load_state_dict(backbone_state(backbone))
        expected = plain(x)
    assert [tuple(m.shape) for m in maps] == [(1, 8, 24, 32), (1, 16, 12, 16), (1, 24, 6, 8), (1, 32, 3, 4)]
    for got, want, again in zip(maps, expected, hidden, strict=True):
        assert torch.equal(got, want) and torch.equal(again, want)
    three = AutoBackbone.from_config(backbone_config("revcol_tiny", [1, 2, 3]), **TINY_CONFIG)
    assert three.channels == [16, 24, 32]
    assert [tuple(m.shape[-2:]) for m in three(x).feature_maps] == [(12, 16), (6, 8), (3, 4)]


def test_the_limits_the_page_names():
    with pytest.raises(ConfigError, match="in_chans must be 3, got 1"):
        AutoBackbone.from_config(TimmBackboneConfig(backbone=FAKE, num_channels=1, use_pretrained_backbone=False))
    three = AutoBackbone.from_config(backbone_config(FAKE, [1, 2, 3]))
    with pytest.raises(IndexError):  # TimmBackbone picks the hidden states by level from the three maps it got
        three(torch.randn(1, 3, 64, 64), output_hidden_states=True)


# --------------------------------------------------------------------------- 2. UperNet, the ADE20K backbone


def test_upernet_gets_the_ade20k_backbone_by_tag_and_trains(published, server, monkeypatch):
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)) or real(name, **kw))
    model = upernet()
    assert not server.requests  # built from the config alone: random weights, nothing downloaded
    model.backbone = TimmBackbone.from_pretrained(NAME, out_indices=ALL_LEVELS)
    assert list(server.requests.elements()) == [SERVED]
    assert [(name, kw["pretrained"], kw["features_only"], list(kw["out_indices"])) for name, kw in calls] == [
        (NAME, False, True, ALL_LEVELS),
        (NAME, True, True, ALL_LEVELS),
    ]
    assert_published_backbone(model, published)

    model.train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    labels = torch.randint(0, 5, (2, 64, 96), generator=generator)
    labels[:, :4] = 255  # ignored pixels, as in ADE20K's "other"
    outputs = model(pixel_values=images, labels=labels)
    assert outputs.logits.shape == (2, 5, 64, 96)
    assert_backbone_trained(model, outputs.loss)


def test_timm_keywords_reach_the_backbone_a_local_file_and_save_memory(tmp_path, server):
    path = tmp_path / "mine.pth"
    source = make_net(dtype=torch.float32, seed=3)
    torch.save(source.state_dict(), path)
    overlay = {"file": str(path)}
    backbone = TimmBackbone.from_pretrained(FAKE, out_indices=ALL_LEVELS, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(backbone_state(backbone)[k], v) for k, v in source.state_dict().items())
    assert networks(backbone)[0].save_memory is True  # RevCol's default
    off = AutoBackbone.from_config(backbone_config(FAKE), save_memory=False)
    assert networks(off)[0].save_memory is False
    assert not server.requests


# --------------------------------------------------------------------------- 3. RT-DETR and Mask2Former


def test_rtdetr_gets_the_backbone_by_tag_and_trains_with_labels_at_an_odd_size(published):
    config = RTDetrConfig(
        backbone_config=backbone_config(NAME, [1, 2, 3]),
        encoder_in_channels=list(FAKE_SPEC.channels[1:]),
        encoder_hidden_dim=32,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        num_queries=10,
        num_denoising=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = RTDetrForObjectDetection(config).train()
    model.model.backbone.model = TimmBackbone.from_pretrained(NAME, out_indices=[1, 2, 3])
    assert_published_backbone(model, published)
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
    ]
    outputs = model(pixel_values=torch.randn(2, 3, 97, 131), labels=labels)
    assert outputs.pred_boxes.shape[0] == 2 and outputs.pred_boxes.shape[-1] == 4
    assert_backbone_trained(model, outputs.loss)


def test_mask2former_gets_the_backbone_by_tag_predicts_and_trains(published):
    config = Mask2FormerConfig(
        backbone_config=backbone_config(NAME),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=5,
        num_labels=3,
        train_num_points=256,
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    model.model.pixel_level_module.encoder = TimmBackbone.from_pretrained(NAME, out_indices=ALL_LEVELS)
    assert_published_backbone(model, published)
    model.eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 64, 96))
    assert outputs.class_queries_logits.shape == (1, 5, 4)  # 3 classes and "no object"
    assert outputs.masks_queries_logits.shape == (1, 5, 16, 24)  # at stride 4

    model.train()
    masks = torch.zeros(2, 64, 96)
    masks[0, :32], masks[1, 32:] = 1, 1
    outputs = model(
        pixel_values=torch.randn(2, 3, 64, 96),
        mask_labels=[masks, masks[:1].flip(-1)],
        class_labels=[torch.tensor([0, 1]), torch.tensor([2])],
    )
    assert_backbone_trained(model, outputs.loss)


# --------------------------------------------------------------------------- 4. save_pretrained / from_pretrained


def test_save_and_from_pretrained_give_the_same_outputs_without_a_download(tmp_path, server):
    model = upernet()
    randomize_(networks(model)[0], seed=4)  # layer scales far from their initial 1e-6: a reset would show
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "upernet")
    assert f'"backbone": "{NAME}"' in (tmp_path / "upernet" / "config.json").read_text()
    loaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "upernet").eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)
    state, again = model.state_dict(), loaded.state_dict()
    assert set(state) == set(again) and all(torch.equal(state[k], again[k]) for k in state)
    assert not server.requests  # the saved weights are loaded, not the published file


# --------------------------------------------------------------------------- 5. the reversible backward


def _backward(model: UperNetForSemanticSegmentation, save_memory: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd saves in a training forward of the backbone, and the backbone's gradients of the model's loss."""
    (network,) = networks(model)
    network.save_memory = save_memory
    model.zero_grad()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    labels = torch.randint(0, 5, (2, 64, 96), generator=generator)
    saved = SavedTensors(exclude=model.parameters())
    with saved.recording():
        model.backbone(images)
    model(pixel_values=images, labels=labels).loss.backward()
    return saved.activation_bytes, {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


def test_the_reversible_backward_is_on_by_default_and_saves_memory():
    torch.manual_seed(0)
    model = upernet().train()
    randomize_(networks(model)[0], seed=2)
    assert [n.save_memory for n in networks(model)] == [True]
    on, grads_on = _backward(model, save_memory=True)
    off, grads_off = _backward(model, save_memory=False)
    assert on < off / 3, (on, off)  # only the columns' outputs are kept, not every level's activations
    assert set(grads_on) == set(grads_off)
    for name, grad in grads_on.items():
        torch.testing.assert_close(grad, grads_off[name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- 6. import revcol first


IMPORT_ORDER = """
from transformers import TimmBackbone, TimmBackboneConfig
import sys
config = TimmBackboneConfig(backbone="revcol_tiny", out_indices=[1, 2, 3], use_pretrained_backbone=False)
try:
    TimmBackbone(config)
except RuntimeError as error:
    print("error:", type(error).__name__, error, "revcol" in sys.modules)
import revcol
print("channels:", TimmBackbone(config, channels=(8, 16, 24, 32), layers=(1, 1, 1, 1), num_subnet=2).channels)
"""


def test_without_import_revcol_timm_knows_no_revcol_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ORDER],
        env=revcol_env(tmp_path) | {"HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("error:", "channels:"))]
    assert lines == ["error: RuntimeError Unknown model (revcol_tiny) False", "channels: [16, 24, 32]"]
    assert not (tmp_path / "network.log").exists()
