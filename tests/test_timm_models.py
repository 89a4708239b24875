"""RevCol as timm models (revcol.timm_models): registration, pretrained configs, and timm's model contract.

The contract tests follow timm's own ``tests/test_models.py`` (named in each docstring), on ``revcol_tiny`` at
small inputs. The authors' classifier, its files and ``pretrained=True``: test_timm_classifier.py.
"""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import timm
import torch
from helpers.models import TINY_CONFIG, seeded_images, tiny_timm_model
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureDictNet, FeatureInfo, FeatureListNet, get_pretrained_cfg
from timm.optim import create_optimizer_v2
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import revcol
from revcol import ConfigError, FullNet
from revcol.core import param_groups as lr_decay
from revcol.diagnostics import randomize_
from revcol.ultralytics.trainers import no_decay_parameters
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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
    outs = model(seeded_images())
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert model.feature_info.channels() == [128, 256, 512] and model.feature_info.reduction() == [8, 16, 32]
    model = timm.create_model("revcol_tiny", drop_path_rate=0.2, save_memory=False, kernel_size=5)
    assert (model.drop_path, model.save_memory, model.kernel_size) == (0.2, False, 5)
    assert timm.create_model("revcol_tiny").drop_path == revcol.VARIANTS["revcol_tiny"].drop_path
    with pytest.raises(ConfigError, match=r"feature_cls 'getter' \(default\), 'hook', 'list' or 'dict' .* got 'fx'"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="fx")
    with pytest.raises(ConfigError, match=r"out_map names the keys of feature_cls='dict' outputs, got .*'list'"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="list", out_map=("a", "b", "c", "d"))
    with pytest.raises(ConfigError, match="out_map needs one distinct key per level of out_indices \\[1, 3\\]"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="dict", out_indices=(1, 3), out_map=("a",))
    with pytest.raises(ConfigError, match="out_indices must name distinct levels, got \\[3, 3\\]"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="dict", out_indices=(3, -1), out_map="ab")
    with pytest.raises(ConfigError, match="'hook' returns the NCHW maps its hooks see"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="hook", output_fmt="NHWC")
    with pytest.raises(ConfigError, match="'NCHW' or 'NHWC', got output_fmt='NLC'"):
        timm.create_model("revcol_tiny", features_only=True, feature_cls="list", output_fmt="NLC")
    with pytest.raises(ConfigError, match="in_chans must be 3"):
        timm.create_model("revcol_tiny", in_chans=1)
    # timm's pretrained= is a flag: a tag or a path there used to load the default file without a word
    for named in ("in22k", "/tmp/x.pth"):
        with pytest.raises(ConfigError, match=r"pretrained= is True or False, got .*'revcol_base\.in22k'"):
            timm.create_model("revcol_base", pretrained=named)
    with pytest.raises(ConfigError, match="global_pool must be one of"):
        timm.create_model("revcol_tiny", global_pool="catavgmax")
    with pytest.raises(TypeError):  # timm's contract: an unknown keyword is an error, never ignored
        timm.create_model("revcol_tiny", device="meta", not_a_model_arg=1)


# --------------------------------------------------------------------------- timm's test_models.py


def test_forward_and_grad_checkpointing_change_nothing(monkeypatch):
    """timm ``test_model_forward``: batch 1, no NaN; ``set_grad_checkpointing`` keeps the outputs.

    Stronger than timm's (which runs eval, where checkpointing is off anyway): in training it switches
    between the reversible backward and plain autograd, and the outputs and gradients agree (in float64, where the
    recomputed activations are exact to rounding; float32 gradient sums differ by a few ulps from one CPU to another).
    """
    model = tiny_timm_model(num_classes=10, drop_path_rate=0.0, save_memory=False).eval()
    x = seeded_images()
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
    out = model(seeded_images(n=2))
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())
    assert out.shape == (2, 42) and not out.isnan().any()


def test_default_cfgs_heads_and_reset_classifier():
    """timm ``test_model_default_cfgs`` at the config's own input size (224)."""
    model = tiny_timm_model().eval()
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
    state = tiny_timm_model().state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    model.reset_classifier(3, "max")
    assert model.get_classifier().out_features == 3 and model(seeded_images()).shape == (1, 3)


class _Allocations(TorchDispatchMode):
    """Bytes of the tensors that torch's ops return while active, by (device type, dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[tuple[str, torch.dtype]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes[t.device.type, t.dtype] += t.numel() * t.element_size()
        return out

    def real(self, dtype: torch.dtype | None = None) -> int:
        """Bytes off the meta device (of ``dtype`` only, if given)."""
        return sum(n for (device, kind), n in self.bytes.items() if device != "meta" and dtype in (None, kind))


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_device_and_dtype_build_the_model_there_once():
    """timm 1.0.31's ``test_model_default_cfgs`` builds with ``device=`` and ``dtype=``: ``device="meta"`` allocates
    nothing, ``dtype=torch.float64`` never makes float32 parameters first."""
    size = sum(t.numel() * 4 for t in _tensors(timm.create_model("revcol_tiny", num_classes=10, **TINY_CONFIG)))
    with _Allocations() as meta_build:
        meta = timm.create_model("revcol_tiny", num_classes=10, device="meta", **TINY_CONFIG)
    assert all(t.is_meta for t in _tensors(meta))
    # a few bytes of bookkeeping (timm's drop-path schedule), against 185 kB of parameters
    assert meta_build.real() < 256 < size
    logits = meta.eval().to(torch.bfloat16)(torch.empty(2, 3, 97, 131, device="meta", dtype=torch.bfloat16))
    assert logits.shape == (2, 10) and logits.dtype == torch.bfloat16

    with _Allocations() as double_build:
        torch.manual_seed(0)
        double = timm.create_model("revcol_tiny", num_classes=10, dtype=torch.float64, **TINY_CONFIG)
    assert {t.dtype for t in _tensors(double)} == {torch.float64}
    assert double_build.real(torch.float32) < 256 and double_build.real(torch.float64) >= 2 * size
    torch.manual_seed(0)
    single = timm.create_model("revcol_tiny", num_classes=10, **TINY_CONFIG)
    for (name, got), want in zip(double.named_parameters(), single.parameters(), strict=True):
        if not name.endswith(("weight", "bias")) or "norm" in name or name.startswith("cls.classifier.0"):
            # the constants (alphas, gammas, norms) of the paper's initialisation, in float64
            torch.testing.assert_close(got, want.double(), rtol=1e-7, atol=0, msg=name)
    assert double.cls.classifier[1].weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert double(seeded_images().double()).dtype == torch.float64

    with torch.device("meta"):  # torch's default device is the default; an explicit device wins over it
        assert next(timm.create_model("revcol_tiny", **TINY_CONFIG).parameters()).is_meta
        assert next(timm.create_model("revcol_tiny", device="cpu", **TINY_CONFIG).parameters()).device.type == "cpu"
    with pytest.raises(ConfigError, match=r"device must be a torch.device or a device name .* got 'gpu0'"):
        timm.create_model("revcol_tiny", device="gpu0", **TINY_CONFIG)
    with pytest.raises(ConfigError, match=r"dtype must be a floating-point torch.dtype .* got torch.int64"):
        timm.create_model("revcol_tiny", dtype=torch.int64, **TINY_CONFIG)


def test_in_chans_is_the_configs():
    """timm 1.0.31's ``test_model_default_cfgs``: ``model.in_chans == default_cfg["input_size"][0]``."""
    model = timm.create_model("revcol_tiny", **TINY_CONFIG)
    assert model.in_chans == model.default_cfg["input_size"][0] == 3


def test_reset_classifier_keeps_the_pooling_device_dtype_and_mode():
    """timm 1.0.31's ``test_model_default_cfgs``: ``reset_classifier(2)`` after ``reset_classifier(0, '')`` keeps
    the pooling off (the Linear then classifies every position, as ConvNeXt's 1x1 conv), and a new Linear takes
    the model's device, dtype and mode."""
    model = tiny_timm_model(**TINY_CONFIG).eval()
    x = seeded_images()
    model.reset_classifier(0, "")
    model.reset_classifier(2)
    assert model.cls.pool_type == "" and model.num_classes == 2
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert features.shape == (1, 32, 2, 2) and logits.shape == (1, 2, 2, 2)
    linear = model.get_classifier()
    for i, j in ((0, 0), (1, 0), (1, 1)):
        torch.testing.assert_close(logits[:, :, i, j], linear(features[:, :, i, j]))
    # the same head from the constructor: timm's ConvNeXt takes global_pool='' with classes too
    unpooled = timm.create_model("revcol_tiny", num_classes=5, global_pool="", **TINY_CONFIG).eval()
    assert unpooled(x).shape == (1, 5, 2, 2)

    model.reset_classifier(3, "max")
    model.reset_classifier(4)
    assert model.cls.pool_type == "max" and model(x).shape == (1, 4)
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2, "avg")
    weight = model.get_classifier().weight
    assert weight.is_meta and weight.dtype == torch.float64
    assert not any(m.training for m in model.modules())
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None


def _check_maps(outputs, channels, reductions, size: int = 64) -> None:
    assert len(outputs) == len(channels)
    for out, c, r in zip(outputs, channels, reductions, strict=True):
        assert out.shape == (1, c, size // r, size // r) and not out.isnan().any()


@pytest.mark.parametrize("feature_cls", [None, "getter", "hook", "list", "dict"])
def test_features_only(feature_cls):
    """timm ``test_model_forward_features`` (every extractor) and ``test_model_forward_intermediates_features``.

    And the maps are the model's own: equal to its ``forward_intermediates``. For the hook class that means
    a forward hook on each module ``feature_info`` names sees exactly the returned map (issue item 4).
    """
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", features_only=True, **kwargs).eval()
    randomize_(model, seed=1)
    info = model.feature_info
    assert info.channels() == [64, 128, 256, 512] and info.reduction() == [4, 8, 16, 32]
    x = seeded_images()
    with torch.no_grad():
        outs = model(x)
        if feature_cls == "dict":
            assert list(outs) == ["0", "1", "2", "3"]  # timm's default keys: str(index)
            outs = list(outs.values())
        _check_maps(outs, info.channels(), info.reduction())
        inner = model.body if feature_cls == "hook" else model.model
        for out, ref in zip(outs, inner.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


LIST_AND_DICT = ["list", "dict", FeatureListNet, FeatureDictNet]  # timm's classes too: ours stand in for them


@pytest.mark.parametrize("feature_cls", LIST_AND_DICT, ids=lambda c: c if isinstance(c, str) else c.__name__)
def test_list_and_dict_features_are_the_getters_maps(feature_cls):
    """feature_cls list and dict: instances of timm's classes, with the getter's state dict keys and, at an odd size
    (97x131: each level floors, as timm's ConvNeXt), its maps bit for bit; out_indices, out_map, NHWC. On the tiny
    config (timm passes backbone keywords through)."""
    as_dict = feature_cls in ("dict", FeatureDictNet)
    options = {"features_only": True, "out_indices": (1, 3), **TINY_CONFIG}
    getter = tiny_timm_model(**options).eval()
    net = timm.create_model("revcol_tiny", feature_cls=feature_cls, **options).eval()
    assert isinstance(net, FeatureDictNet) and isinstance(net, FeatureListNet) is not as_dict
    assert list(net.state_dict()) == list(getter.state_dict())  # model.stem..., model.subnet..., the head's norm
    assert not any(k.startswith("model.cls.classifier.1") for k in net.state_dict())  # the Linear is pruned
    net.load_state_dict(getter.state_dict())
    assert net.feature_info.channels() == [16, 32] and net.feature_info.reduction() == [8, 32]
    assert list(net.feature_info.out_indices) == [1, 3]
    x = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = getter(x)
        outs = net(x)
        if as_dict:
            assert list(outs) == ["1", "3"]
            outs = list(outs.values())
        assert [tuple(o.shape) for o in outs] == [(1, 16, 12, 16), (1, 32, 3, 4)]  # 97 // 8, 131 // 8, ...
        for got, want in zip(outs, expected, strict=True):
            assert torch.equal(got, want)
        # timm's return_layers picks the levels: transformers' TimmBackbone swaps in all of them for hidden states
        net.return_layers = {info["module"]: str(i) for i, info in enumerate(net.feature_info.info)}
        every = net(x)
        every = list(every.values()) if as_dict else every
        assert [o.shape[1] for o in every] == list(TINY_CONFIG["channels"])
        assert torch.equal(every[1], expected[0]) and torch.equal(every[3], expected[1])

        extra = {"out_map": ("p3", "p5")} if as_dict else {}
        nhwc = timm.create_model("revcol_tiny", feature_cls=feature_cls, output_fmt="NHWC", **options, **extra).eval()
        nhwc.load_state_dict(getter.state_dict())
        assert nhwc.output_fmt == "NHWC"
        outs = nhwc(x)
        if as_dict:
            assert list(outs) == ["p3", "p5"]
            outs = list(outs.values())
        for got, want in zip(outs, expected, strict=True):
            assert torch.equal(got, want.permute(0, 2, 3, 1))


@pytest.mark.parametrize("feature_cls", ["list", "dict"])
def test_list_and_dict_grad_checkpointing_is_the_reversible_backward(feature_cls, monkeypatch):
    """timm ``test_features_only_grad_checkpointing_backward`` for list and dict: ``set_grad_checkpointing`` switches
    the model's reversible backward (counted), and the features and every gradient agree (float64, as above)."""
    net = tiny_timm_model(features_only=True, feature_cls=feature_cls, drop_path_rate=0.0, **TINY_CONFIG)
    net = net.train().double()
    reversible_columns = []
    apply_column = revcol.ReverseFunction.apply_column
    monkeypatch.setattr(
        revcol.ReverseFunction, "apply_column", lambda *a: reversible_columns.append(1) or apply_column(*a)
    )
    x = seeded_images(n=2).double()
    runs = []
    for enable in (True, False):
        net.set_grad_checkpointing(enable)
        assert net.grad_checkpointing is enable and net.model.save_memory is enable
        reversible_columns.clear()
        net.zero_grad()
        outs = net(x)
        outs = list(outs.values()) if feature_cls == "dict" else outs
        sum(o.square().mean() for o in outs).backward()
        assert len(reversible_columns) == (net.model.num_subnet if enable else 0)
        runs.append(([o.detach() for o in outs], {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    for with_rev, plain in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(with_rev, plain, rtol=1e-12, atol=1e-12)
    # every backbone parameter, none of the head's norm (pruned head: unused)
    assert set(runs[0][1]) == set(runs[1][1]) == {n for n in net.state_dict() if not n.startswith("model.cls.")}
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(grad, runs[1][1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_forward_intermediates_and_pruning():
    """timm ``test_model_forward_intermediates``, plus each argument of ``forward_intermediates`` and pruning."""
    model = tiny_timm_model().eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = seeded_images()
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
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        assert [tuple(m.shape) for m in nhwc] == [(1, 8, 8, 128), (1, 2, 2, 512)]
        torch.testing.assert_close(nhwc[1], maps[3].permute(0, 2, 3, 1), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="'NCHW' or 'NHWC', got output_fmt='NLC'"):
        model.forward_intermediates(x, output_fmt="NLC")
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


def test_no_weight_decay_is_the_rule_the_ultralytics_trainers_follow():
    """One rule (``param_groups.exempt_from_weight_decay``) for timm and the Ultralytics trainers: every column alpha
    and every layer-scale gamma, and nothing else."""
    model = timm.create_model("revcol_tiny", num_classes=10)
    alphas = {f"subnet{i}.alpha{level}" for i in range(model.num_subnet) for level in range(4)}
    gammas = {name for name, _ in model.named_parameters() if name.endswith(".gamma")}
    assert len(gammas) == model.num_subnet * sum(model.layers)
    assert model.no_weight_decay() == alphas | gammas
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay_parameters(model)} == alphas | gammas
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    decay = {names[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert all(decay[name] == 0.0 for name in alphas | gammas)
    assert decay["stem.0.weight"] == 0.05


def test_a_tag_fixes_the_architecture_even_without_its_weights():
    """transformers builds a saved model from its config (the tagged name, no weights) and loads its own file after:
    RevCol-H's 7x7 tags must build 7x7 kernels then too."""
    with torch.device("meta"):
        assert timm.create_model("revcol_huge.megdata_ft_ade20k", features_only=True).model.kernel_size == 7
        assert timm.create_model("revcol_huge.megdata").kernel_size == 3
        assert timm.create_model("revcol_tiny", output_stride=32).kernel_size == 3
    with pytest.raises(ConfigError, match="output_stride must be None or 32"):
        timm.create_model("revcol_tiny", output_stride=16)
