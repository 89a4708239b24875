"""Safe loading: torch's allow-list is never widened; crafted checkpoints build nothing and open nothing."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers.models import TINY_CONFIG
from helpers.yamls import TINY_RTDETR_YAML
from ultralytics import RTDETR
from ultralytics.nn import tasks

from revcol import FullNet
from revcol.ultralytics import safe_load
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.safe_load import checkpoint_classes_allowed


class _Call:
    """Pickles as ``cls(*args)`` (GLOBAL + REDUCE), the shape of an attack on an allow-listed class."""

    def __init__(self, cls: type, *args) -> None:
        self.cls, self.args = cls, args

    def __reduce__(self):
        return self.cls, self.args


def _crafted(path: Path, cls: type, *args) -> Path:
    torch.save({"model": _Call(cls, *args)}, path)
    return path


HUGE = ([4096, 8192, 16384, 32768], [4, 4, 4, 4], 8)  # tens of GB if __init__ ran


@pytest.fixture
def inits(monkeypatch):
    """Every FullNet.__init__ call; one with the crafted sizes fails at once instead of allocating them."""
    calls, real_init = [], FullNet.__init__

    def spy_init(self, *args, **kwargs):
        calls.append(args or kwargs)
        if args[:1] == (HUGE[0],):
            raise AssertionError("FullNet.__init__ ran with the crafted sizes")
        return real_init(self, *args, **kwargs)

    monkeypatch.setattr(FullNet, "__init__", spy_init)
    return calls


@pytest.fixture
def attacks(tmp_path):
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"not for the unpickler")
    return secret, {
        "huge FullNet": _crafted(tmp_path / "huge.pt", FullNet, *HUGE),
        "RevColBackbone reading a file": _crafted(
            tmp_path / "opener.pt", RevColBackbone, "revcol_tiny", {"pretrained": str(secret)}
        ),
    }


def _revcol_entries() -> list:
    return [g for g in torch.serialization.get_safe_globals() if "revcol" in repr(g) or "timm" in repr(g)]


def test_crafted_files_are_real_attacks_on_a_naive_allow_list(tmp_path):
    # The control: allow-listing the class itself (what revcol did before) lets REDUCE run __init__ with any args.
    small = _crafted(tmp_path / "small.pt", FullNet, *TINY_CONFIG.values())
    with torch.serialization.safe_globals([FullNet]):
        built = torch.load(small, weights_only=True)["model"]
    assert isinstance(built, FullNet) and built.channels == TINY_CONFIG["channels"]


def test_plain_weights_only_load_refuses_revcol_classes(attacks, inits):
    for path in attacks[1].values():
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
            torch.load(path, weights_only=True)
    assert not inits
    assert not _revcol_entries()


def test_ultralytics_safe_load_of_crafted_files_builds_nothing_and_opens_nothing(attacks, inits, monkeypatch):
    secret, files = attacks
    opened, real_open = [], builtins.open

    def spy_open(file, *args, **kwargs):
        opened.append(Path(os.fsdecode(file)).resolve() if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)  # what torch.load opens a path with
    monkeypatch.setattr(io, "open", spy_open)  # what Path.open calls
    for name, path in files.items():
        with pytest.raises(TypeError) as refused:
            tasks.torch_safe_load(str(path), safe_only=True)
        assert "refusing to call" in str(refused.value.__cause__), name
        assert path.resolve() in opened, "the spy sees the checkpoint itself being read"
    assert secret.resolve() not in opened
    assert not inits
    assert not _revcol_entries()


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    (root / "tiny.yaml").write_text(TINY_RTDETR_YAML)
    # Seeded: the file holds float16 weights, and a drawn weight of 4 or more (the decoder's N(0, 1) embedding has a
    # few near that) rounds by more than the check's 1e-3; what ran before in the process must not decide that.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RTDETR(str(root / "tiny.yaml"))
    model.save(root / "tiny.pt")
    return model, root / "tiny.pt"


def test_ultralytics_safe_load_restores_a_saved_model_and_leaves_no_allow_list_entries(saved_checkpoint):
    model, path = saved_checkpoint
    with pytest.raises(pickle.UnpicklingError):  # import revcol alone allows nothing
        torch.load(path, weights_only=True)
    ckpt, _ = tasks.torch_safe_load(str(path), safe_only=True)
    loaded = ckpt["model"]
    assert isinstance(loaded.model[0], RevColBackbone)
    expected = model.model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value.float(), expected[key].float(), rtol=0, atol=1e-3)
    assert not _revcol_entries()


def test_overlapping_scopes_keep_the_entries_until_the_last_leaves():
    inside, release = threading.Event(), threading.Event()

    def other_load():
        with checkpoint_classes_allowed():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other_load)
    thread.start()
    assert inside.wait(10)
    with checkpoint_classes_allowed():
        assert _revcol_entries()
    assert _revcol_entries(), "this thread's exit must not strip the other thread's in-flight load"
    release.set()
    thread.join()
    assert not _revcol_entries()


def test_stand_ins_never_run_init_and_refuse_arguments():
    makers = {name: obj for obj, name in safe_load._checkpoint_globals()}
    maker = makers["revcol.core.network.FullNet"]
    assert makers["revcol.model.FullNet"] is maker  # the name files saved before the module map pickle
    bare = maker()
    assert type(bare) is FullNet and not hasattr(bare, "channels")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to call revcol\.core\.network\.FullNet with arguments"):
        maker(*TINY_CONFIG.values())


ALLOW_LIST = """
import json, torch
import timm.layers, ultralytics.engine.model, ultralytics.models, ultralytics.nn.tasks  # what revcol imports
def snapshot():
    return sorted(map(repr, torch.serialization.get_safe_globals()))
before = snapshot()
import revcol
print(json.dumps({"before": before, "after": snapshot(), "registered": revcol.is_registered()}))
"""


def test_import_revcol_leaves_torch_allow_list_as_it_was():
    # torch adds entries of its own when ultralytics imports torch.distributed, hence the imports before `before`
    env = {**os.environ, "YOLO_OFFLINE": "true"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ALLOW_LIST)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["registered"]
    assert result["after"] == result["before"]
