"""The standard parameter layout and safetensors files: contiguous tensors, reading and writing, HF folders."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from revcol_helpers import TINY_CHANNELS, TINY_YOLO_YAML, make_input, make_net
from ultralytics import YOLO

import revcol
from revcol import CheckpointError, FullNet, VariantSpec, load_pretrained, save_backbone

TINY_CLASSIFIER = {"channels": TINY_CHANNELS, "layers": (1, 1, 1, 1), "num_subnet": 2}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("build", ["fullnet", "huge_wiring", "classifier"])
def test_every_parameter_and_buffer_is_contiguous_and_the_state_dict_saves(build, tmp_path):
    if build == "classifier":
        model = timm.create_model("revcol_tiny", num_classes=5, **TINY_CLASSIFIER)
    else:
        model = FullNet(TINY_CHANNELS, (1, 2, 1, 1), 3, level0_from_coarsest=build == "huge_wiring")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert any(t.dim() == 4 for t in tensors.values())
    assert [name for name, t in tensors.items() if not t.is_contiguous()] == []
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    assert vector.numel() == sum(p.numel() for p in model.parameters())
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_activations_still_run_channels_last():
    """The design keeps channels-last activations (docs/design.md, "Data path"), whatever the input layout."""
    model = make_net(num_subnet=2).eval()
    with torch.no_grad():
        outputs = model(make_input(1, 64, 64))
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)


# --------------------------------------------------------------------------- reading


LAYOUTS = {
    "plain": lambda sd: sd,
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "with_heads": lambda sd: {
        **sd,
        "cls.classifier.1.weight": torch.randn(10, 32),
        "cls.classifier.1.bias": torch.randn(10),
    },
    "detector": lambda sd: {**{f"backbone.{k}": v for k, v in sd.items()}, "neck.conv.weight": torch.randn(4, 4, 1, 1)},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_pretrained_reads_safetensors_with_the_same_key_rules(layout, source, target, tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(LAYOUTS[layout](source.state_dict()), path)
    result = load_pretrained(target, path)
    _assert_same_weights(target, source)
    assert sorted(result.loaded) == sorted(source.state_dict())
    extra = {"with_heads": ["cls.classifier.1.bias", "cls.classifier.1.weight"], "detector": ["neck.conv.weight"]}
    assert result.skipped == extra.get(layout, [])


def test_format_is_told_by_content_not_by_name(source, target, tmp_path):
    as_pth = tmp_path / "w.pth"
    safetensors.torch.save_file(source.state_dict(), as_pth)
    load_pretrained(target, as_pth)
    _assert_same_weights(target, source)
    other = make_net(num_subnet=2, dtype=torch.float32, seed=13, randomize=False)
    as_safetensors = tmp_path / "t.safetensors"
    torch.save(source.state_dict(), as_safetensors)
    load_pretrained(other, as_safetensors)
    _assert_same_weights(other, source)


def test_bfloat16_file_loads_into_a_float32_model(source, target, tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.bfloat16() for k, v in source.state_dict().items()}, path)
    load_pretrained(target, path)
    assert target.stem[0].weight.dtype == torch.float32
    for name, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[name].bfloat16().float()), name


def _refused(model: torch.nn.Module, path, pattern: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_safetensors_with_other_keys_shapes_or_dtypes_is_a_clear_error(source, target, tmp_path):
    state = source.state_dict()
    missing = {k: v for k, v in state.items() if k != "subnet1.alpha2"}
    safetensors.torch.save_file(missing, tmp_path / "missing.safetensors")
    _refused(target, tmp_path / "missing.safetensors", r"1 backbone tensors missing from the file \[subnet1\.alpha2\]")

    extra = {**state, "subnet7.alpha0": torch.zeros(1, 8, 1, 1)}
    safetensors.torch.save_file(extra, tmp_path / "extra.safetensors")
    _refused(target, tmp_path / "extra.safetensors", r"1 backbone tensors the model does not have \[subnet7\.alpha0\]")

    shape = {**state, "stem.0.weight": torch.zeros(8, 3, 2, 2)}
    safetensors.torch.save_file(shape, tmp_path / "shape.safetensors")
    _refused(target, tmp_path / "shape.safetensors", r"shape mismatch for stem\.0\.weight: checkpoint \(8, 3, 2, 2\)")

    dtype = {**state, "subnet0.alpha1": torch.zeros(state["subnet0.alpha1"].shape, dtype=torch.int64)}
    safetensors.torch.save_file(dtype, tmp_path / "dtype.safetensors")
    _refused(target, tmp_path / "dtype.safetensors", r"dtype mismatch for subnet0\.alpha1: checkpoint torch\.int64")


def test_integer_weight_in_a_torch_file_is_refused_too(source, target, tmp_path):
    state = {**source.state_dict(), "stem.1.bias": torch.zeros(TINY_CHANNELS[0], dtype=torch.int32)}
    torch.save(state, tmp_path / "w.pth")
    _refused(
        target, tmp_path / "w.pth", r"dtype mismatch for stem\.1\.bias: checkpoint torch\.int32, model torch\.float32"
    )


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_safetensors_is_a_clear_error(fraction, source, target, tmp_path):
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file(source.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * fraction)])
    _refused(target, cut, "not a readable safetensors file|not a PyTorch checkpoint")


def test_corrupt_header_is_a_clear_error(target, tmp_path):
    path = tmp_path / "w.safetensors"
    header = b'{"stem.0.weight": 12'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    _refused(target, path, "not a readable safetensors file")


# --------------------------------------------------------------------------- every place a path is accepted


def test_build_variant_and_yaml_option_read_safetensors(source, tmp_path, monkeypatch):
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", VariantSpec(TINY_CHANNELS, (1, 1, 1, 1), 2, 0.1))
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    _assert_same_weights(revcol.build_variant("revcol_test", pretrained=path), source)
    backbone = revcol.RevColBackbone("revcol_test", {"pretrained": str(path)})
    _assert_same_weights(backbone, source)


@pytest.mark.parametrize(("safe", "name"), [(True, "model.safetensors"), (False, "pytorch_model.bin")])
def test_save_for_hf_folder_loads_back_with_the_same_logits(safe, name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CLASSIFIER).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.fill_(0.3)  # so the blocks count in the logits
    timm.models.save_for_hf(model, tmp_path / "hf", model_config={"num_classes": 7}, safe_serialization=safe)
    file = tmp_path / "hf" / name
    assert file.is_file() and (tmp_path / "hf" / "config.json").is_file()
    loaded = timm.create_model(
        "revcol_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(file)}, num_classes=7, **TINY_CLASSIFIER
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _assert_same_weights(loaded, model)


def test_save_for_hf_file_of_another_configuration_is_a_clear_error(tmp_path):
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CLASSIFIER)
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    file = tmp_path / "hf" / "model.safetensors"
    with pytest.raises(CheckpointError, match="does not match this RevCol configuration"):
        timm.create_model(
            "revcol_tiny",
            pretrained=True,
            pretrained_cfg_overlay={"file": str(file)},
            num_classes=7,
            channels=TINY_CHANNELS,
            layers=(1, 1, 1, 1),
            num_subnet=3,
        )


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_ultralytics_backbone_exports_to_a_file_fullnet_loads(suffix, tmp_path):
    yaml_path = tmp_path / "tiny-revcol.yaml"
    yaml_path.write_text(TINY_YOLO_YAML)
    yolo = YOLO(str(yaml_path))
    backbone = yolo.model.model[0]
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_()  # weights no fresh model has
    path = save_backbone(yolo, tmp_path / f"backbone{suffix}")
    assert path == tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        assert sorted(safetensors.torch.load_file(path)) == sorted(backbone.state_dict())
    fresh = FullNet(backbone.channels, backbone.layers, backbone.num_subnet)
    load_pretrained(fresh, path)
    _assert_same_weights(fresh, backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(fresh.eval()(x), backbone.eval()(x), strict=True):
            assert torch.equal(a, b)


def test_save_backbone_of_a_classifier_writes_the_backbone_only(tmp_path):
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CLASSIFIER)
    path = save_backbone(model, tmp_path / "b.safetensors")
    keys = set(safetensors.torch.load_file(path))
    assert keys == {k for k in model.state_dict() if not k.startswith("cls.")}


def test_save_backbone_needs_exactly_one_backbone(tmp_path):
    with pytest.raises(CheckpointError, match=r"exactly one RevCol backbone.*found 0 in Linear"):
        save_backbone(torch.nn.Linear(2, 2), tmp_path / "b.safetensors")
    two = torch.nn.ModuleList([make_net(num_subnet=1), make_net(num_subnet=1)])
    with pytest.raises(CheckpointError, match="found 2 in ModuleList"):
        save_backbone(two, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
