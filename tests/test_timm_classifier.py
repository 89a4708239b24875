"""The authors' ImageNet classifier as a timm model (revcol.timm_models): parameter names and logits, their files
loaded by ``load_classifier_weights`` (``load_pretrained`` with the head's rule), ``pretrained=True`` and a config's
``file`` through ``revcol.weights``, Hugging Face folders, and the README's recipe.

Pretrained loading goes through a local HTTP server with a small fake variant; nothing here reaches the internet.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers.checkpoints import assert_same_weights
from helpers.models import TINY_CONFIG, seeded_images, tiny_timm_model
from helpers.server import WeightsServer
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

import revcol
from revcol import CheckpointError, FullNet, RevColClassifier, VariantSpec, timm_models
from revcol.diagnostics import randomize_
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAKE = "fake_revcol_timm"  # outside the revcol* pattern, so listing the real variants is unaffected
FAKE_SPEC = VariantSpec(**{**TINY_CONFIG, "num_subnet": 4}, drop_path=0.0)  # the authors' four supervision heads
FAKE_ENTRY = PublishedWeights(FAKE, "in1k", "fake_revcol_timm_1k.pth", 64, 80.0, 7)
LAYOUT_KEYS = ("stem.", "subnet")


# --------------------------------------------------------------------------- the authors' classifier


def _authors_logits(model: RevColClassifier, x: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """The authors' ``Classifier`` written out: average pool, LayerNorm(eps 1e-6), Linear, on the last c3."""
    backbone = FullNet(**{k: getattr(model, k) for k in ("channels", "layers", "num_subnet", "kernel_size")})
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(LAYOUT_KEYS)})
    pooled = backbone.eval()(x)[-1].mean((2, 3))
    normed = F.layer_norm(pooled, pooled.shape[-1:], head["classifier.0.weight"], head["classifier.0.bias"], 1e-6)
    return F.linear(normed, head["classifier.1.weight"], head["classifier.1.bias"])


def test_parameter_names_are_the_authors_and_logits_their_head():
    model = tiny_timm_model(num_classes=10).eval()
    backbone_keys = set(revcol.build_variant("revcol_tiny").state_dict())
    head_keys = {k for k in model.state_dict() if not k.startswith(LAYOUT_KEYS)}
    assert set(model.state_dict()) - head_keys == backbone_keys
    assert head_keys == {f"cls.classifier.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    x = seeded_images()
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
    x = seeded_images()
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
    model = _fake_model(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit a 32-channel"):
        revcol.load_classifier_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the backbone neither


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
    x = seeded_images()
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
    # timm's dtype=: the float32 file loads into the float64 parameters it built
    double = timm.create_model(FAKE, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, dtype=torch.float64)
    assert {v.dtype for v in double.state_dict().values()} == {torch.float64}
    torch.testing.assert_close(double.state_dict(), {k: v.double() for k, v in model.state_dict().items()})
    assert not server.requests
    with pytest.raises(CheckpointError, match="no published weights exist for revcol_xlarge"):
        timm.create_model("revcol_xlarge", pretrained=True)
    server.files.clear()
    with pytest.raises(CheckpointError, match=r"could not download fake_revcol_timm_1k\.pth"):
        timm.create_model(FAKE, pretrained=True)


@pytest.mark.parametrize(("safe", "name"), [(True, "model.safetensors"), (False, "pytorch_model.bin")])
def test_save_for_hf_folder_loads_back_with_the_same_logits(safe, name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CONFIG).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.fill_(0.3)  # so the blocks count in the logits
    timm.models.save_for_hf(model, tmp_path / "hf", model_config={"num_classes": 7}, safe_serialization=safe)
    file = tmp_path / "hf" / name
    assert file.is_file() and (tmp_path / "hf" / "config.json").is_file()
    loaded = timm.create_model(
        "revcol_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(file)}, num_classes=7, **TINY_CONFIG
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert_same_weights(loaded, model)


def test_save_for_hf_file_of_another_configuration_is_a_clear_error(tmp_path):
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CONFIG)
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    file = tmp_path / "hf" / "model.safetensors"
    with pytest.raises(CheckpointError, match="does not match this RevCol configuration"):
        timm.create_model(
            "revcol_tiny",
            pretrained=True,
            pretrained_cfg_overlay={"file": str(file)},
            num_classes=7,
            **{**TINY_CONFIG, "num_subnet": 3},
        )


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
