"""Writing a backbone (revcol.checkpoints.backbone.save_backbone, docs/reliability.md "Saving a backbone"): from any
module holding exactly one RevCol backbone (``find_backbone``), in either format, atomically under a SIGKILL or a full
disk; and the parameter layout every writer relies on.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import safetensors.torch
import timm
import torch
from helpers.checkpoints import assert_same_weights
from helpers.models import TINY_CONFIG, make_input, make_net
from helpers.processes import revcol_env
from helpers.yamls import TINY_YOLO_YAML
from ultralytics import YOLO

from revcol import CheckpointError, ConfigError, FullNet, load_pretrained
from revcol.checkpoints.backbone import save_backbone
from revcol.checkpoints.files import read_checkpoint
from revcol.core.network import find_backbone, find_backbones

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("build", ["fullnet", "huge_wiring", "classifier"])
def test_every_parameter_and_buffer_is_contiguous_and_the_state_dict_saves(build, tmp_path):
    if build == "classifier":
        model = timm.create_model("revcol_tiny", num_classes=5, **TINY_CONFIG)
    else:
        model = FullNet(
            **{**TINY_CONFIG, "layers": (1, 2, 1, 1), "num_subnet": 3}, level0_from_coarsest=build == "huge_wiring"
        )
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
    model = make_net().eval()
    with torch.no_grad():
        outputs = model(make_input(1, 64, 64))
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)


# --------------------------------------------------------------------------- which backbone, which format


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
    assert_same_weights(fresh, backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(fresh.eval()(x), backbone.eval()(x), strict=True):
            assert torch.equal(a, b)


def test_save_backbone_of_a_classifier_writes_the_backbone_only(tmp_path):
    model = timm.create_model("revcol_tiny", num_classes=7, **TINY_CONFIG)
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


def test_find_backbone_finds_the_one_backbone_of_any_module_or_says_how_many(tmp_path):
    """The one helper save_backbone, shard and the trainers use to find the backbone inside a model."""
    net = make_net(num_subnet=1)
    yolo_path = tmp_path / "tiny-revcol.yaml"
    yolo_path.write_text(TINY_YOLO_YAML)
    yolo = YOLO(str(yolo_path))
    classifier = timm.create_model("revcol_tiny", num_classes=3, **TINY_CONFIG)
    assert find_backbone(net, "this") is net
    assert find_backbone(yolo, "this") is yolo.model.model[0]
    assert find_backbone(classifier, "this") is classifier
    assert find_backbones("a model.yaml") == [] and find_backbones(None) == []
    two = torch.nn.Sequential(net, make_net(num_subnet=1))
    assert find_backbones(two) == [net, two[1]]
    with pytest.raises(ConfigError, match=r"^this needs a module holding exactly one RevCol backbone \(FullNet\), "):
        find_backbone(two, "this")
    with pytest.raises(CheckpointError, match=r"found 0 in Linear$"):
        find_backbone(torch.nn.Linear(2, 2), "that", CheckpointError)


# --------------------------------------------------------------------------- faults


SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import torch
    from revcol import FullNet
    from revcol.checkpoints.backbone import save_backbone

    path = sys.argv[1]
    model = FullNet(channels=(32, 64, 96, 128), layers=(1, 1, 2, 1), num_subnet=3)
    for round in range(1, 10**6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(round)
        save_backbone(model, path)
        if round == 1:
            print("saved", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_backbone_killed_at_random_moments_leaves_a_whole_file(suffix, tmp_path):
    rng = random.Random(suffix)
    path = tmp_path / f"backbone{suffix}"
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True, env=revcol_env(tmp_path)
        ) as process:
            while (line := process.stdout.readline()) and line.strip() != "saved":  # past Ultralytics' notices
                pass
            assert line.strip() == "saved"
            threading.Event().wait(rng.uniform(0.05, 0.6))
            process.kill()
        state = read_checkpoint(path)
        (round_number,) = {float(v.flatten()[0]) for v in state.values()}  # one save's tensors, not two mixed
        assert all(bool((v == round_number).all()) for v in state.values())
    save_backbone(make_net(), path)  # the next save sweeps what the killed ones left
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_backbone_on_a_full_disk_keeps_the_previous_file(suffix, source, tmp_path):
    path = save_backbone(source, tmp_path / f"backbone{suffix}")
    before = path.read_bytes()
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import torch
        from revcol import CheckpointError
        from revcol.checkpoints.backbone import save_backbone
        from helpers.models import make_net

        model = make_net(dtype=torch.float32, seed=99)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_backbone(model, sys.argv[1])
        except CheckpointError as error:
            print("error:", error)
        """
    )
    env = revcol_env(tmp_path / "env", tests_on_path=True)
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]  # one line
    assert "could not write" in error and "is unchanged" in error
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "env") == [path.name]
