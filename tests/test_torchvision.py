"""RevCol as a torchvision detection backbone (revcol.torchvision): the FPN maps, the four detectors training and
predicting on an image whose size is no multiple of 32, frozen columns with the reversible backward, the authors'
COCO tag, and the options' errors. The example's quick run: test_examples.py."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
from helpers.models import TINY_CONFIG, TINY_SPEC, assert_close_per_tensor, make_net
from helpers.server import offline_weights
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import revcol
from revcol import CheckpointError, ConfigError
from revcol.diagnostics import gradients, output_weights
from revcol.torchvision import RevColFPN, revcol_fpn_backbone
from revcol.weights.published import WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CHANNELS = 32  # the FPN's, in the detector tests: divisible by 32 for FCOS's GroupNorm(32, ...)
HEIGHT, WIDTH = 97, 131  # no multiple of 32 (nor of 2): every level's size is floored
# Each detector keeps the image at its size (min_size, max_size), with few regions and detections: fast.
RCNN_OPTIONS = {
    "min_size": HEIGHT,
    "max_size": WIDTH,
    "rpn_pre_nms_top_n_train": 64,
    "rpn_post_nms_top_n_train": 32,
    "rpn_pre_nms_top_n_test": 64,
    "rpn_post_nms_top_n_test": 32,
    "box_batch_size_per_image": 16,
    "box_score_thresh": 0.0,  # random weights score low: keep every detection, so there is something to check
    "box_detections_per_img": 8,
}
DENSE_OPTIONS = {"min_size": HEIGHT, "max_size": WIDTH, "score_thresh": 0.0, "detections_per_img": 8}
LOSSES = {
    FasterRCNN: {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    MaskRCNN: {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    RetinaNet: {"classification", "bbox_regression"},
    FCOS: {"classification", "bbox_regression", "bbox_ctrness"},
}


def _levels(height: int, width: int) -> list[tuple[int, int]]:
    """The floored size of each RevCol level for an input of ``height`` x ``width``."""
    return [(height // 4 // 2**level, width // 4 // 2**level) for level in range(4)]


def _sample() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One HEIGHT x WIDTH image with two objects: boxes, labels and masks (a filled box and a disc)."""
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.uint8)
    masks[0, 10:60, 20:70] = 1
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    masks[1] = ((ys - 60) ** 2 + (xs - 100) ** 2 <= 20**2).to(torch.uint8)
    target = {
        "boxes": torch.tensor([[20.0, 10.0, 70.0, 60.0], [80.0, 40.0, 121.0, 81.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }
    return [image], [target]


def _detector(kind: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    if kind in (RetinaNet, FCOS):  # as torchvision's v2 models: C3-C5 and P6, P7 from P5
        backbone = revcol_fpn_backbone(
            TINY_CONFIG,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(CHANNELS, CHANNELS),
            out_channels=CHANNELS,
        )
        return kind(backbone, num_classes=3, **DENSE_OPTIONS)
    return kind(revcol_fpn_backbone(TINY_CONFIG, out_channels=CHANNELS), num_classes=3, **RCNN_OPTIONS)


# --------------------------------------------------------------------------- the maps


def test_four_levels_and_a_pooled_one_by_default_at_any_input_size():
    torch.manual_seed(0)
    backbone = revcol_fpn_backbone(TINY_CONFIG)
    assert isinstance(backbone, RevColFPN) and backbone.out_channels == 256
    assert backbone.returned_layers == (1, 2, 3, 4) and isinstance(backbone.fpn.extra_blocks, LastLevelMaxPool)
    maps = backbone(torch.randn(2, 3, HEIGHT, WIDTH))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    sizes = [*_levels(HEIGHT, WIDTH), (2, 2)]  # pool: a max-pool of kernel 1, stride 2 on the 3x4 map
    assert [tuple(m.shape) for m in maps.values()] == [(2, 256, h, w) for h, w in sizes]
    assert sizes[:4] == [(24, 32), (12, 16), (6, 8), (3, 4)]


def test_returned_layers_norm_layer_and_out_channels():
    torch.manual_seed(0)
    backbone = revcol_fpn_backbone(TINY_CONFIG, returned_layers=[2, 4], norm_layer=nn.BatchNorm2d, out_channels=24)
    # the FPN reads levels 1 and 3 of the tiny config (16 and 32 channels)
    assert [block[0].in_channels for block in backbone.fpn.inner_blocks] == [16, 32]
    assert all(isinstance(block[1], nn.BatchNorm2d) for block in backbone.fpn.layer_blocks)
    maps = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "0": (1, 24, 8, 12),
        "1": (1, 24, 2, 3),
        "pool": (1, 24, 1, 2),
    }


def test_a_variant_is_built_with_its_configuration():
    with torch.device("meta"):  # no memory, no initialisation work
        backbone = revcol_fpn_backbone("revcol_small", save_memory=False, kernel_size=5)
    body = backbone.body
    assert (body.channels, body.layers, body.num_subnet) == ((64, 128, 256, 512), (2, 2, 4, 2), 8)
    assert body.drop_path == 0.3 and body.kernel_size == 5 and not body.save_memory
    assert [block[0].in_channels for block in backbone.fpn.inner_blocks] == [64, 128, 256, 512]


def test_save_memory_is_the_bodys():
    backbone = revcol_fpn_backbone(TINY_CONFIG, save_memory=False)
    assert backbone.save_memory is False and backbone.body.save_memory is False
    backbone.save_memory = True
    assert backbone.body.save_memory is True
    with pytest.raises(ConfigError, match="save_memory must be True or False, got 'yes'"):
        backbone.save_memory = "yes"


# --------------------------------------------------------------------------- the detectors


@pytest.mark.parametrize("kind", [FasterRCNN, MaskRCNN, RetinaNet, FCOS], ids=lambda k: k.__name__)
def test_a_training_step_reaches_the_backbone(kind):
    model = _detector(kind).train()
    images, targets = _sample()
    batch, _ = model.transform(images, targets)
    assert batch.image_sizes == [(HEIGHT, WIDTH)]  # not resized: the backbone sees the odd size, padded to 32
    assert tuple(batch.tensors.shape[-2:]) == (128, 160)
    losses = model(images, targets)
    assert set(losses) == LOSSES[kind]
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    body = model.backbone.body
    for name, part in [("stem", body.stem), *((f"subnet{i}", s) for i, s in enumerate(body.subnets))]:
        assert sum(p.grad.abs().sum().item() for p in part.parameters()) > 0, name
    before = {name: p.detach().clone() for name, p in body.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {name.split(".")[0] for name, p in body.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"stem", *(f"subnet{i}" for i in range(body.num_subnet))}


@pytest.mark.parametrize("kind", [FasterRCNN, MaskRCNN, RetinaNet, FCOS], ids=lambda k: k.__name__)
def test_inference_gives_boxes_labels_scores_and_masks(kind):
    model = _detector(kind).eval()
    images, _ = _sample()
    with torch.no_grad():
        (output,) = model(images)
    expected = {"boxes", "labels", "scores"} | ({"masks"} if kind is MaskRCNN else set())
    assert set(output) == expected
    n = len(output["scores"])
    assert 0 < n <= 8  # every detection is kept (score threshold 0), at most detections_per_img
    assert output["boxes"].shape == (n, 4) and output["labels"].shape == (n,)
    assert (output["boxes"][:, 2] <= WIDTH).all() and (output["boxes"][:, 3] <= HEIGHT).all()
    first = 0 if kind in (RetinaNet, FCOS) else 1  # the R-CNNs' class 0 is the background
    assert ((output["labels"] >= first) & (output["labels"] <= 2)).all()
    if kind is MaskRCNN:
        assert output["masks"].shape == (n, 1, HEIGHT, WIDTH)
        assert ((output["masks"] >= 0) & (output["masks"] <= 1)).all()


# --------------------------------------------------------------------------- gradients


class _Maps(nn.Module):
    """The FPN's maps as a list, with the backbone's ``save_memory``: what ``revcol.diagnostics.gradients`` runs."""

    def __init__(self, backbone: RevColFPN) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def save_memory(self) -> bool:
        return self.backbone.save_memory

    @save_memory.setter
    def save_memory(self, value: bool) -> None:
        self.backbone.save_memory = value

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x).values())


def _float64_fpn(num_subnet: int = 2, trainable_columns: int | None = None, drop_path: float = 0.0) -> RevColFPN:
    """A tiny RevCol with non-trivial weights (``make_net``) and an FPN, in float64; the same weights every call."""
    body = make_net(num_subnet=num_subnet, drop_path=drop_path, seed=3)
    torch.manual_seed(4)
    return RevColFPN(body, trainable_columns=trainable_columns, out_channels=16).double()


@pytest.mark.parametrize("trainable", [None, 1])
def test_the_reversible_backward_gives_plain_autograds_gradients_through_the_fpn(trainable):
    x = torch.randn(2, 3, 67, 99, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # drop-path: the recompute must draw the forward's masks; frozen columns pass the input's gradient through
    model = _Maps(_float64_fpn(trainable_columns=trainable, drop_path=0.2))
    outputs, plain = gradients(model, x, save_memory=False)
    reversible_outputs, reversible = gradients(model, x, save_memory=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs, reversible_outputs, strict=True))
    assert set(plain) == {name for name, p in model.named_parameters() if p.requires_grad} | {"input"}
    assert_close_per_tensor(reversible, plain, tol=1e-9)


def _backward(model: RevColFPN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of ``sum_l <w_l, map_l>`` (``output_weights``) in the model's modes; its gradients."""
    model.zero_grad(set_to_none=True)
    maps = list(model(x).values())
    sum((m * w).sum() for m, w in zip(maps, output_weights(maps), strict=True)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("trainable", [0, 1, 3])
def test_frozen_columns_get_no_gradients_and_the_others_exact_ones(trainable):
    frozen = _float64_fpn(num_subnet=3, trainable_columns=trainable, drop_path=0.2).train()
    parts = [frozen.body.stem, *frozen.body.subnets]
    prefixes = tuple(["body.stem."] * (trainable < 3) + [f"body.subnet{i}." for i in range(3 - trainable)])
    assert {n for n, p in frozen.named_parameters() if not p.requires_grad} == {
        n for n, _ in frozen.named_parameters() if n.startswith(prefixes)
    }
    # the frozen parts are a fixed function: in eval mode (no drop-path) whatever train() says
    assert [m.training for m in parts] == [trainable == 3] + [i >= 3 - trainable for i in range(3)]
    # the reference: nothing frozen, plain autograd, the same parts in eval mode (the same drop-path draws)
    reference = _float64_fpn(num_subnet=3, drop_path=0.2).train()
    reference.save_memory = False
    for part, twin in zip([reference.body.stem, *reference.body.subnets], parts, strict=True):
        part.train(twin.training)

    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.manual_seed(7)
    got = _backward(frozen, x)  # reversible, with an input that needs no gradient: a detector's case
    torch.manual_seed(7)
    expected = _backward(reference, x)
    assert set(got) == {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in frozen.parameters() if not p.requires_grad)
    assert_close_per_tensor(got, {name: expected[name] for name in got}, tol=1e-9)


# --------------------------------------------------------------------------- weights

FAKE = "fake_revcol_torchvision"  # not revcol*: no timm model is registered for it
COCO_ENTRY = PublishedWeights(
    FAKE, "in1k_ft_coco", "cmr_fake_torchvision.pth", 800, None, None, False, "detection", "COCO, Cascade Mask R-CNN"
)


def test_the_authors_coco_tag_loads_the_backbone_of_their_detector(server, tmp_path, monkeypatch):
    offline_weights(tmp_path, monkeypatch)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    monkeypatch.setitem(revcol.VARIANTS, FAKE, TINY_SPEC)
    monkeypatch.setitem(WEIGHTS, FAKE, {COCO_ENTRY.tag: COCO_ENTRY})
    backbone = make_net(dtype=torch.float32, seed=9).state_dict()
    # mmdetection's layout: the backbone under backbone., beside the neck and heads, in state_dict beside meta
    detector = {f"backbone.{k}": v for k, v in backbone.items()}
    detector["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 8, 1, 1)
    detector["roi_head.bbox_head.0.fc_cls.weight"] = torch.randn(81, 1024)
    buffer = io.BytesIO()
    torch.save({"meta": {"epoch": 36, "CLASSES": ("person",)}, "state_dict": detector}, buffer)
    server.files[f"/weights/{COCO_ENTRY.filename}"] = (buffer.getvalue(), "ok")

    for bad in ({"out_channels": 0}, {"returned_layers": [4, 3]}, {"trainable_columns": 3}):
        with pytest.raises(ConfigError):
            revcol_fpn_backbone(FAKE, pretrained="in1k_ft_coco", **bad)
    assert not server.requests  # a bad option is reported before any download
    model = revcol_fpn_backbone(FAKE, pretrained="in1k_ft_coco", trainable_columns=1)
    assert server.requests == {f"/weights/{COCO_ENTRY.filename}": 1}
    state = model.body.state_dict()
    assert set(state) == set(backbone) and all(torch.equal(state[k], v) for k, v in backbone.items())
    assert model.body.drop_path == TINY_SPEC.drop_path  # the variant's rate
    with pytest.raises(CheckpointError, match=f"{FAKE} has no published weights tagged 'in22k_ft_coco'"):
        revcol_fpn_backbone(FAKE, pretrained="in22k_ft_coco")


def test_a_custom_configuration_loads_a_checkpoint_path(tmp_path):
    source = make_net(dtype=torch.float32, seed=10)
    path = tmp_path / "backbone.pth"
    torch.save({"model": source.state_dict()}, path)
    model = revcol_fpn_backbone(TINY_CONFIG, pretrained=path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.body.state_dict().values(), source.state_dict().values(), strict=True)
    )
    assert model.body.drop_path == 0.0
    with pytest.raises(CheckpointError, match="no published weights exist for a custom RevCol configuration"):
        revcol_fpn_backbone(TINY_CONFIG, pretrained=True)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"returned_layers": [0, 1]}, r"returned_layers must be distinct ints from 1 .* got \[0, 1\]"),
        ({"returned_layers": [3, 2]}, r"in increasing order.* got \[3, 2\]"),
        ({"returned_layers": [2, 2]}, r"returned_layers must be distinct ints"),
        ({"returned_layers": []}, r"returned_layers must be .* got \[\]"),
        ({"returned_layers": "234"}, r"returned_layers must be .* got '234'"),
        ({"returned_layers": [True]}, r"returned_layers must be .* got \[True\]"),
        ({"returned_layers": [5]}, r"to 4 \(level 3, stride 32\)"),
        ({"trainable_columns": 3}, r"trainable_columns must be an int from 0 .* to 2 .* got 3"),
        ({"trainable_columns": -1}, r"trainable_columns must be an int from 0 .* got -1"),
        ({"trainable_columns": 1.0}, r"trainable_columns must be an int .* got 1.0"),
        ({"out_channels": 0}, r"out_channels must be a positive int .* got 0"),
        ({"extra_blocks": nn.Identity()}, r"extra_blocks must be a torchvision ExtraFPNBlock .* got Identity"),
        ({"norm_layer": "bn"}, r"norm_layer must be None or a callable .* got 'bn'"),
        ({"save_memory": "yes"}, r"save_memory must be True or False, got 'yes'"),
        ({"drop_path": 1.5}, r"drop_path must be a number in \[0, 1\)"),
    ],
)
def test_a_bad_option_says_what_is_allowed(options, message):
    with pytest.raises(ConfigError, match=message):
        revcol_fpn_backbone(TINY_CONFIG, **options)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("revcol_nano", r"unknown RevCol variant 'revcol_nano'; known variants: revcol_tiny, "),
        ({"channels": (8, 16, 24, 32), "layers": (1, 1, 1, 1)}, r"missing: \['num_subnet'\], unknown: none"),
        ({**TINY_CONFIG, "depth": 3}, r"takes channels, layers, num_subnet .* unknown: \['depth'\]"),
        (42, r"name must be a RevCol variant \(revcol_tiny, .*\) or a mapping .* got int"),
        ({**TINY_CONFIG, "channels": (8, 16)}, r"channels must be 4 ints"),
    ],
)
def test_a_bad_name_says_what_is_allowed(name, message):
    with pytest.raises(ConfigError, match=message):
        revcol_fpn_backbone(name)


def test_only_a_revcol_backbone_is_wrapped():
    with pytest.raises(ConfigError, match=r"RevColFPN wraps a RevCol backbone .*got Conv2d"):
        RevColFPN(nn.Conv2d(3, 8, 3))


def test_without_torchvision_the_error_names_the_extra(monkeypatch):
    for module in ("torchvision", "torchvision.ops", "torchvision.ops.feature_pyramid_network"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    hint = r'install it with pip install "revcol\[torchvision\]"'
    with pytest.raises(ImportError, match=hint):
        revcol_fpn_backbone(TINY_CONFIG)
    with pytest.raises(ImportError, match=hint):
        RevColFPN(make_net())
