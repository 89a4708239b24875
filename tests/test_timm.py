"""RevCol as timm models (revcol.timm_models): registration, timm's model contract, the authors' classifier.

The contract tests follow timm's own ``tests/test_models.py`` (named in each docstring), on ``revcol_tiny`` at
small inputs. Pretrained loading goes through a local HTTP server with a small fake variant; nothing here
reaches the internet.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from revcol_helpers import TINY_CHANNELS, WeightsServer, randomize_
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.models import FeatureInfo, get_pretrained_cfg
from timm.optim import create_optimizer_v2

import revcol
from revcol import CheckpointError, ConfigError, FullNet, RevColClassifier, VariantSpec, timm_models
from revcol.core import param_groups as lr_decay
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAKE = "fake_revcol_timm"  # outside the revcol* pattern, so listing the real variants is unaffected
FAKE_SPEC = VariantSpec(TINY_CHANNELS, (1, 1, 1, 1), 4, 0.0)  # 4 columns: the authors' four supervision heads
FAKE_ENTRY = PublishedWeights(FAKE, "in1k", "fake_revcol_timm_1k.pth", 64, 80.0, 7)
LAYOUT_KEYS = ("stem.", "subnet")


def _x(size: int = 64, n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(**kwargs) -> RevColClassifier:
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", **kwargs)
    randomize_(model, seed=1)  # layer scale 1e-6 would make every block nearly the identity
    return model


# --------------------------------------------------------------------------- registration and configs


def test_import_revcol_registers_every_variant_with_its_published_files():
    assert set(timm.list_models("revcol*")) == set(revcol.VARIANTS)
    assert "revcol_huge" in timm.list_models("revcol*")
    expected = {f"{variant}.{tag}" for variant, tags in WEIGHTS.items() for tag in tags}
    assert set(timm.list_pretrained("revcol*")) == expected
    for variant, tags in WEIGHTS.items():
        assert get_pretrained_cfg(variant).tag == DEFAULT_TAGS[variant]  # what pretrained=True loads
        for tag, entry in tags.items():
            cfg = get_pretrained_cfg(f"{variant}.{tag}")
            size = entry.resolution
            assert cfg.url == entry.url
            assert cfg.input_size == (3, size, size) and cfg.pool_size == (size // 32, size // 32)
            assert cfg.num_classes == (entry.num_classes or 0)
            assert (cfg.crop_pct, cfg.crop_mode) == ((0.875, "center") if size == 224 else (1.0, "squash"))
            assert (cfg.mean, cfg.std, cfg.interpolation) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic")
            assert (cfg.classifier, cfg.first_conv) == ("cls.classifier.1", "stem.0")
    assert get_pretrained_cfg("revcol_xlarge").url == ""  # no published file: not in list_pretrained


def test_create_model_takes_the_issue_call_and_the_backbone_options():
    model = timm.create_model(
        "revcol_small", pretrained=False, num_classes=5, features_only=True, out_indices=(1, 2, 3)
    )
    outs = model(_x())
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert model.feature_info.channels() == [128, 256, 512] and model.feature_info.reduction() == [8, 16, 32]
    model = timm.create_model("revcol_tiny", drop_path_rate=0.2, save_memory=False, kernel_size=5)
    assert (model.drop_path, model.save_memory, model.kernel_size) == (0.2, False, 5)
    assert timm.create_model("revcol_tiny").drop_path == revcol.VARIANTS["revcol_tiny"].drop_path
    with pytest.raises(ConfigError, match="feature_cls 'getter' \\(default\\) or 'hook', got 'list'"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="list")
    with pytest.raises(ConfigError, match="in_chans must be 3"):
        timm.create_model("revcol_tiny", in_chans=1)
    with pytest.raises(ConfigError, match="global_pool must be one of"):
        timm.create_model("revcol_tiny", global_pool="catavgmax")
    with pytest.raises(ConfigError, match="needs num_classes=0"):
        timm.create_model("revcol_tiny", global_pool="")


# --------------------------------------------------------------------------- timm's test_models.py


def test_forward_and_grad_checkpointing_change_nothing(monkeypatch):
    """timm ``test_model_forward``: batch 1, no NaN; ``set_grad_checkpointing`` keeps the outputs.

    Stronger than timm's (which runs eval, where checkpointing is off anyway): in training it switches
    between the reversible backward and plain autograd, and the outputs and gradients agree (in float64, where the
    recomputed activations are exact to rounding; float32 gradient sums differ by a few ulps from one CPU to another).
    """
    model = _tiny(num_classes=10, drop_path_rate=0.0, save_memory=False).eval()
    x = _x()
    out = model(x)
    assert out.shape == (1, 10) and not out.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)

    reversible_columns = []
    apply_column = revcol.ReverseFunction.apply_column
    monkeypatch.setattr(
        revcol.ReverseFunction, "apply_column", lambda *a: reversible_columns.append(1) or apply_column(*a)
    )
    model.train().double()
    x = x.double()
    runs = []
    for enable in (True, False):
        model.set_grad_checkpointing(enable)
        reversible_columns.clear()
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        assert len(reversible_columns) == (model.num_subnet if enable else 0)
        runs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-12, atol=1e-12)
    for with_rev, plain in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(with_rev, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("save_memory", [True, False])
def test_backward_reaches_every_parameter(save_memory):
    """timm ``test_model_backward``: num_classes=42, batch 2, train mode, every parameter gets a gradient."""
    model = timm.create_model("revcol_tiny", num_classes=42, save_memory=save_memory).train()
    out = model(_x(n=2))
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())
    assert out.shape == (2, 42) and not out.isnan().any()


def test_default_cfgs_heads_and_reset_classifier():
    """timm ``test_model_default_cfgs`` at the config's own input size (224)."""
    model = _tiny().eval()
    assert model.num_classes == 1000 and model.num_features == 512 and model.head_hidden_size == 512
    cfg = model.default_cfg
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, 512, *cfg["pool_size"])
        fresh = timm.create_model("revcol_tiny", num_classes=0, global_pool="").eval()
        assert fresh(x).shape == (1, 512, *cfg["pool_size"])
    state = _tiny().state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    model.reset_classifier(3, "max")
    assert model.get_classifier().out_features == 3 and model(_x()).shape == (1, 3)


def _check_maps(outputs, channels, reductions, size: int = 64) -> None:
    assert len(outputs) == len(channels)
    for out, c, r in zip(outputs, channels, reductions, strict=True):
        assert out.shape == (1, c, size // r, size // r) and not out.isnan().any()


@pytest.mark.parametrize("feature_cls", [None, "getter", "hook"])
def test_features_only(feature_cls):
    """timm ``test_model_forward_features`` (default and hook) and ``test_model_forward_intermediates_features``.

    And the maps are the model's own: equal to its ``forward_intermediates``. For the hook class that means
    a forward hook on each module ``feature_info`` names sees exactly the returned map (issue item 4).
    """
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", features_only=True, **kwargs).eval()
    randomize_(model, seed=1)
    info = model.feature_info
    assert info.channels() == [64, 128, 256, 512] and info.reduction() == [4, 8, 16, 32]
    x = _x()
    with torch.no_grad():
        outs = model(x)
        _check_maps(outs, info.channels(), info.reduction())
        inner = model.body if feature_cls == "hook" else model.model
        for out, ref in zip(outs, inner.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_forward_intermediates_and_pruning():
    """timm ``test_model_forward_intermediates``, plus each argument of ``forward_intermediates`` and pruning."""
    model = _tiny().eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _x()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        _check_maps(maps, info.channels(), info.reduction())
        torch.testing.assert_close(final, model.forward_features(x))
        reference = FullNet(**revcol.VARIANTS["revcol_tiny"].fullnet_kwargs())
        reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("cls.")})
        for got, want in zip(maps, reference.eval()(x), strict=True):
            torch.testing.assert_close(got, want)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)

        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == [256, 512]
        picked = model.forward_intermediates(x, indices=[0, 3], norm=True, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(picked[0], maps[0])
        torch.testing.assert_close(picked[1], maps[3])
    with pytest.raises(ConfigError, match="NCHW only"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises((ValueError, AssertionError, IndexError)):
        model.forward_intermediates(x, indices=[4])

    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert model.num_classes == 0 and model(x).dim() == 4  # head gone: unpooled features


def test_layer_decay_follows_the_authors_depth_map():
    """timm's ``create_optimizer_v2(layer_decay=...)`` through ``group_matcher``: RevCol's column-aware depths."""
    model = timm.create_model("revcol_tiny", num_classes=10)
    rate = 0.8
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=rate)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert set(seen) == set(names.values())
    layers, columns = model.layers, model.num_subnet
    for name, (scale, decay) in seen.items():
        assert scale == pytest.approx(lr_decay.lr_scale(name, layers, columns, rate)), name
        if ".alpha" in name or name.endswith((".gamma", ".bias")) or ".norm." in name:
            assert decay == 0.0, name
    scales = {name: scale for name, (scale, _) in seen.items()}
    assert scales["stem.0.weight"] == min(scales.values()) < scales["subnet3.level3.blocks.1.pwconv2.weight"]
    assert scales["cls.classifier.1.weight"] == 1.0
    # column-aware: the first block of the last column is shallower than the last block of the first column
    assert scales["subnet3.level0.blocks.0.dwconv.weight"] < scales["subnet0.level3.blocks.1.dwconv.weight"]
    assert model.group_matcher(coarse=True)["stem"] == r"^stem"


# --------------------------------------------------------------------------- the authors' classifier


def _authors_logits(model: RevColClassifier, x: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """The authors' ``Classifier`` written out: average pool, LayerNorm(eps 1e-6), Linear, on the last c3."""
    backbone = FullNet(**{k: getattr(model, k) for k in ("channels", "layers", "num_subnet", "kernel_size")})
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(LAYOUT_KEYS)})
    pooled = backbone.eval()(x)[-1].mean((2, 3))
    normed = F.layer_norm(pooled, pooled.shape[-1:], head["classifier.0.weight"], head["classifier.0.bias"], 1e-6)
    return F.linear(normed, head["classifier.1.weight"], head["classifier.1.bias"])


def test_parameter_names_are_the_authors_and_logits_their_head():
    model = _tiny(num_classes=10).eval()
    backbone_keys = set(revcol.build_variant("revcol_tiny").state_dict())
    head_keys = {k for k in model.state_dict() if not k.startswith(LAYOUT_KEYS)}
    assert set(model.state_dict()) - head_keys == backbone_keys
    assert head_keys == {f"cls.classifier.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    x = _x()
    head = {k.removeprefix("cls."): v for k, v in model.state_dict().items() if k.startswith("cls.")}
    with torch.no_grad():
        torch.testing.assert_close(model(x), _authors_logits(model, x, head))


def test_head_init_scale_scales_the_initial_linear():
    torch.manual_seed(3)
    plain = timm.create_model("revcol_tiny", num_classes=10).cls.classifier[1]
    torch.manual_seed(3)
    scaled = timm.create_model("revcol_tiny", num_classes=10, head_init_scale=0.25).cls.classifier[1]
    torch.testing.assert_close(scaled.weight, 0.25 * plain.weight)
    torch.testing.assert_close(scaled.bias, 0.25 * plain.bias)
    assert plain.weight.std().item() == pytest.approx(0.02, rel=0.1)


def _fake_model(num_classes: int = 7, seed: int = 5) -> RevColClassifier:
    torch.manual_seed(seed)
    model = RevColClassifier(num_classes=num_classes, **FAKE_SPEC.fullnet_kwargs())
    randomize_(model, seed=seed)
    return model.eval()


def _authors_file(model: RevColClassifier, layout: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A checkpoint as the authors save it, and the head that their network would classify with."""
    state = model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith(LAYOUT_KEYS)}
    head = {k.removeprefix("cls."): v for k, v in state.items() if k.startswith("cls.")}
    if layout == "finetuned":
        saved = {"model": {f"module.{k}": v for k, v in state.items()}}
    else:  # intermediate supervision: four heads (the last reads the last column) and image decoders
        heads = {f"cls_blocks.{i}.{k}": v if i == 3 else torch.randn_like(v) for i in range(4) for k, v in head.items()}
        decoders = {"decoder_blocks.0.projback.0.weight": torch.randn(48, 32, 1, 1)}
        saved = {"model": {**backbone, **heads, **decoders}}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue(), head


@pytest.mark.parametrize("layout", ["finetuned", "intermediate_supervision"])
def test_authors_files_give_their_logits(layout, tmp_path):
    source = _fake_model()
    body, head = _authors_file(source, layout)
    path = tmp_path / "authors.pth"
    path.write_bytes(body)
    model = _fake_model(seed=9)
    result = revcol.load_classifier_weights(model, path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _authors_logits(source, x, head))
        torch.testing.assert_close(model(x), source(x))
    assert set(result.loaded) == set(model.state_dict())
    if layout != "finetuned":
        assert (
            "cls_blocks.0.classifier.1.weight" in result.skipped
            and "decoder_blocks.0.projback.0.weight" in result.skipped
        )

    other = _fake_model(num_classes=3, seed=9)  # another class count: backbone and norm loaded, Linear new
    linear = other.cls.classifier[1].weight.clone()
    revcol.load_classifier_weights(other, path)
    torch.testing.assert_close(other.cls.classifier[0].weight, source.cls.classifier[0].weight)
    torch.testing.assert_close(other.cls.classifier[1].weight, linear)
    torch.testing.assert_close(other.forward_features(x), source.forward_features(x))


def test_head_that_does_not_fit_is_an_error(tmp_path):
    state = _fake_model().state_dict()
    state["cls.classifier.0.weight"] = torch.ones(5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit a 32-channel"):
        revcol.load_classifier_weights(_fake_model(), path)


# --------------------------------------------------------------------------- pretrained=True via a local server


@pytest.fixture
def fake_variant(server, tmp_path, monkeypatch) -> tuple[RevColClassifier, WeightsServer]:
    """A small variant with one published file (an authors' intermediate-supervision file) on the local server."""
    monkeypatch.setitem(revcol.VARIANTS, FAKE, FAKE_SPEC)
    monkeypatch.setitem(WEIGHTS, FAKE, {"in1k": FAKE_ENTRY})
    monkeypatch.setitem(DEFAULT_TAGS, FAKE, "in1k")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is registered again (an earlier test)
        timm_models.register(FAKE)
    source = _fake_model()
    server.files[f"/weights/{FAKE_ENTRY.filename}"] = (_authors_file(source, "intermediate_supervision")[0], "ok")
    return source, server


def test_pretrained_true_downloads_once_through_revcol_weights(fake_variant):
    source, server = fake_variant
    assert timm.list_pretrained(FAKE + "*") == [f"{FAKE}.in1k"]
    x = _x()
    with torch.no_grad():
        model = timm.create_model(FAKE, pretrained=True).eval()
        assert model.num_classes == 7 and model.pretrained_cfg["tag"] == "in1k"
        torch.testing.assert_close(model(x), source(x))
        again = timm.create_model(f"{FAKE}.in1k", pretrained=True, num_classes=2).eval()
        torch.testing.assert_close(again.forward_features(x), source.forward_features(x))
        features = timm.create_model(FAKE, pretrained=True, features_only=True, out_indices=(2, 3))
        for got, want in zip(features(x), source.forward_intermediates(x, indices=[2, 3])[1], strict=True):
            torch.testing.assert_close(got, want)
    assert list(server.requests.elements()) == [f"/weights/{FAKE_ENTRY.filename}"]  # later ones: the hub cache
    assert (revcol.weights.cache_dir() / FAKE_ENTRY.filename).is_file()


def test_pretrained_file_overlay_and_errors(fake_variant, tmp_path):
    _, server = fake_variant
    path = tmp_path / "mine.pth"
    torch.save(_fake_model(seed=11).state_dict(), path)
    model = timm.create_model(FAKE, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).eval()
    torch.testing.assert_close(model.state_dict(), _fake_model(seed=11).state_dict())
    assert not server.requests
    with pytest.raises(CheckpointError, match="no published weights exist for revcol_xlarge"):
        timm.create_model("revcol_xlarge", pretrained=True)
    server.files.clear()
    with pytest.raises(CheckpointError, match=r"could not download fake_revcol_timm_1k\.pth"):
        timm.create_model(FAKE, pretrained=True)


def test_classify_a_folder_of_images_with_timms_data_config(fake_variant, tmp_path):
    """The README recipe: ``resolve_data_config`` + ``create_transform`` do the authors' evaluation transform."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(80, 96), (120, 64), (64, 64)]):
        # smooth pictures: resampling rules then decide the pixels, not noise
        yy, xx = np.mgrid[0:h, 0:w] / 16.0
        channels = [np.sin(xx + i), np.cos(yy - i), np.sin(xx * 0.5 + yy * 0.7)]
        picture = (np.stack(channels, -1) * 127 + 128).astype(np.uint8)
        Image.fromarray(picture).save(folder / f"{i}.png")
    model = timm.create_model(FAKE, pretrained=True).eval()
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 64, 64) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.875
    transform = create_transform(**config)
    paths = sorted(folder.glob("*.png"))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        top = model(batch).softmax(-1).topk(3)
    assert top.indices.shape == (3, 3) and torch.all(top.values.sum(-1) <= 1.0 + 1e-6)

    # the authors' test transform, written with PIL: shorter side to 256/224 of the size (bicubic), centre crop
    image = Image.open(paths[0]).convert("RGB")
    short = int(64 / 0.875)
    w, h = image.size
    image = image.resize((short, int(h * short / w)) if w <= h else (int(w * short / h), short), Image.BICUBIC)
    left, upper = round((image.size[0] - 64) / 2), round((image.size[1] - 64) / 2)
    array = np.asarray(image.crop((left, upper, left + 64, upper + 64)), dtype=np.float32) / 255
    expected = (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / (
        torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    )
    torch.testing.assert_close(batch[0], expected, atol=1e-5, rtol=0)
