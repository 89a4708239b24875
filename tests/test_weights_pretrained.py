"""What ``pretrained=`` means (``revcol.weights.pretrained``): ``True`` and tags download the published file,
anything else is a path, decided before anything is built, the same through every entry point; a path naming no
file; and ``check_published``, through ``revcol info`` and ``revcol download`` (``docs/reliability.md``).

Nothing here reaches the internet: every test runs with ``REVCOL_WEIGHTS_URL`` pointing at 127.0.0.1 (a
closed port unless the test serves files) and name look-ups of any other host fail.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from helpers.models import TINY_SPEC, make_net
from helpers.server import TEST_ENTRY, WeightsServer, offline_weights, published_checkpoint
from helpers.yamls import TINY_RTDETR_YAML, TINY_YOLO_YAML

import revcol
from revcol import CheckpointError, FullNet, load_pretrained
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published
from revcol.weights.cache import cache_path
from revcol.weights.pretrained import resolve
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ENTRY = TEST_ENTRY
SERVED = f"/weights/{ENTRY.filename}"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> str:
    """Every test: torch's cache in tmp_path, weights from a closed local port, no other host reachable."""
    return offline_weights(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file in the authors' layout (``model``, with intermediate-supervision heads) and its backbone tensors."""
    return published_checkpoint()


@pytest.fixture
def small_variant(monkeypatch) -> None:
    """``revcol_test``: a small variant whose one published file is ENTRY, so that downloads stay tiny."""
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", TINY_SPEC)
    monkeypatch.setitem(WEIGHTS, "revcol_test", {"in1k": ENTRY})
    monkeypatch.setitem(DEFAULT_TAGS, "revcol_test", "in1k")


@pytest.fixture
def serve(server, checkpoint, monkeypatch):
    """``serve()``: the server holds the test checkpoint from now on and REVCOL_WEIGHTS_URL points at it."""

    def start() -> WeightsServer:
        server.files[SERVED] = (checkpoint[0], "ok")
        monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
        return server

    return start


@pytest.fixture
def serving(serve) -> WeightsServer:
    return serve()


def _cache_files() -> list[str]:
    folder = weights_cache.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- resolve: what pretrained= means


@pytest.mark.usefixtures("small_variant")
@pytest.mark.parametrize("pretrained", [True, "in1k"])
def test_true_and_tags_download_and_load(pretrained, serving, checkpoint):
    path = resolve("revcol_test", pretrained)
    assert path == cache_path(ENTRY)
    model = FullNet(**revcol.VARIANTS["revcol_test"].fullnet_kwargs())
    result = load_pretrained(model, path)
    assert sorted(result.skipped) == ["cls_blocks.0.bias", "cls_blocks.0.weight", "decoder_blocks.0.conv.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint[1].items())


@pytest.mark.usefixtures("small_variant")
def test_a_tag_wins_over_a_file_of_that_name(serving, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in1k").write_bytes(b"not this one")
    assert resolve("revcol_test", "in1k") == cache_path(ENTRY)
    assert serving.requests == {SERVED: 1}


def test_a_mirror_only_file_is_never_asked_of_the_release(server, checkpoint, monkeypatch):
    """pretrained=True for revcol_huge: its default file, fetched from the mirror and nowhere else."""
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", server.base + "/release/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/mirror/")
    server.files["/weights/mirror/revcol_huge_megdata_in1k.pth"] = (checkpoint[0], "ok")
    path = resolve("revcol_huge", True)
    assert path == cache_path(WEIGHTS["revcol_huge"]["megdata_ft_in1k"]) and path.read_bytes() == checkpoint[0]
    assert dict(server.requests) == {"/weights/mirror/revcol_huge_megdata_in1k.pth": 1}


def test_other_strings_and_paths_are_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in22k").write_bytes(b"")
    assert resolve("revcol_tiny", "~/w.pth") == tmp_path / "w.pth"
    assert resolve(None, "w.pth") == Path("w.pth")  # not checked here: read_checkpoint reports a missing file
    assert resolve("revcol_tiny", "in22k") == Path("in22k")  # an existing file, though it looks like a tag
    assert resolve("revcol_tiny", Path("in1k_copy")) == Path("in1k_copy")  # a Path is never a tag
    assert resolve(None, "models/in1k") == Path("models/in1k")
    assert _cache_files() == []


@pytest.mark.parametrize(
    ("variant", "pretrained", "expected"),
    [
        (None, True, r"^no published weights exist for a custom RevCol configuration; give a checkpoint path$"),
        (None, "in1k", r"custom RevCol configuration \(asked for 'in1k'.*give a checkpoint path"),
        ("revcol_xlarge", True, r"no published weights exist for revcol_xlarge; .*revcol_tiny, revcol_small"),
        ("revcol_xlarge", "in1k", r"no published weights exist for revcol_xlarge \(asked for 'in1k'"),
        ("revcol_tiny", "in22k", r"revcol_tiny has no published weights tagged 'in22k'.*; its tags: in1k \("),
        ("revcol_base", "1k", r"its tags: in1k, in22k, in22k_ft_in1k, in22k_ft_in1k_384 \(or give a checkpoint path"),
        ("revcol_tiny", "", r"no published weights tagged ''"),
        ("revcol_tiny", False, r"must be True, a published tag or a checkpoint path, got False"),
        ("revcol_tiny", None, r"got None"),
        ("revcol_tiny", 3, r"got 3"),
    ],
)
def test_resolve_errors_say_what_is_allowed(variant, pretrained, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        resolve(variant, pretrained)
    assert _cache_files() == []  # decided before any download


# --------------------------------------------------------------------------- the same through every entry point


@pytest.mark.usefixtures("small_variant")
@pytest.mark.parametrize("pretrained", [True, "in1k"])
def test_variant_builder_takes_true_or_a_tag(pretrained, serving, checkpoint):
    model = revcol.build_variant("revcol_test", pretrained=pretrained)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint[1].items())
    assert serving.requests[SERVED] == 1


@pytest.mark.usefixtures("small_variant")
@pytest.mark.parametrize("pretrained", [True, "in1k", "path"])
def test_yaml_backbone_line_takes_true_a_tag_or_a_path(pretrained, serving, checkpoint, tmp_path, monkeypatch):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    from revcol.ultralytics import yaml_rows as contract

    monkeypatch.setattr(contract, "BACKBONE_NAMES", contract.BACKBONE_NAMES | {"revcol_test"})
    if pretrained == "path":
        pretrained = str(tmp_path / "mine.pth")
        Path(pretrained).write_bytes(checkpoint[0])
    d = yaml.safe_load(TINY_RTDETR_YAML)
    d["backbone"][0] = [-1, 1, "revcol_test", [{"pretrained": pretrained}]]
    backbone = RTDETRDetectionModel(d, verbose=False).model[0]
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in checkpoint[1].items())


def test_yaml_custom_backbone_with_true_says_no_published_weights():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    d = yaml.safe_load(TINY_RTDETR_YAML)
    d["backbone"][0][3][0]["pretrained"] = True
    with pytest.raises(CheckpointError, match="no published weights exist for a custom RevCol configuration"):
        RTDETRDetectionModel(d, verbose=False)


@pytest.mark.usefixtures("small_variant")
def test_cli_download_fills_the_cache_and_info_says_so(serving, capsys):
    from revcol.cli import main

    def info_row() -> list[str]:
        assert main(["info", "revcol_test"]) == 0
        return next(line.split() for line in capsys.readouterr().out.splitlines() if "revcol_test_1k.pth" in line)

    assert info_row() == ["revcol_test", "in1k", "*", "revcol_test_1k.pth", "224", "80.0", "1000", "no"]
    assert main(["download", "revcol_test"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_path(ENTRY))
    assert info_row()[-1] == "yes"
    assert main(["download", "revcol_test", "in22k"]) == 2
    assert "has no published weights tagged 'in22k'; tags: in1k" in capsys.readouterr().err


# --------------------------------------------------------------------------- pretrained= naming no file (#19.8)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "weights.pth"
    os.mkfifo(path)
    return path


def _in_thread(function, seconds: float = 10.0) -> BaseException | None:
    """Run ``function`` with a bound: a read of a FIFO or of /dev/zero would never return."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize(("where", "kind"), [("fifo", "a FIFO \\(named pipe\\)"), ("/dev/zero", "a character device")])
def test_pretrained_naming_a_fifo_or_a_device_says_it_is_not_a_regular_file(where, kind, request):
    path = request.getfixturevalue("fifo") if where == "fifo" else Path(where)
    error = _in_thread(lambda: load_pretrained(make_net(), path))
    assert isinstance(error, CheckpointError)
    assert str(error) == f"{path} is {kind.replace(chr(92), '')}, not a regular file: a checkpoint is a file"


def test_a_yaml_row_naming_a_fifo_fails_clearly(fifo, monkeypatch):
    from ultralytics.nn.tasks import DetectionModel

    d = yaml.safe_load(TINY_YOLO_YAML)
    d["backbone"][0][3][0]["pretrained"] = str(fifo)
    error = _in_thread(lambda: DetectionModel(d, verbose=False))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)


# --------------------------------------------------------------------------- revcol info / download: check_published


def _info(capsys) -> tuple[int, str, str]:
    from revcol.cli import main

    status = main(["info", "revcol_test"])
    out, err = capsys.readouterr()
    (row,) = [line.split() for line in out.splitlines() if ENTRY.filename in line]
    return status, row[-1], err


def _other_variant(body: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(make_net(num_subnet=3).state_dict(), buffer)  # three columns, not two
    return buffer.getvalue()


DAMAGE = {
    "empty": (lambda body: b"", "is not a PyTorch checkpoint: .* an empty file"),
    "truncated": (
        lambda body: body[: len(body) // 2],
        "is not a readable PyTorch checkpoint \\(truncated or corrupt\\)",
    ),
    "other_variant": (_other_variant, "does not match this RevCol configuration"),
}


@pytest.mark.usefixtures("small_variant")
@pytest.mark.parametrize("damage", DAMAGE)
def test_info_and_download_check_what_they_report(damage, serve, checkpoint, capsys):
    from revcol.cli import main

    make, reason = DAMAGE[damage]
    body = checkpoint[0]
    cache_path(ENTRY).parent.mkdir(parents=True)
    cache_path(ENTRY).write_bytes(make(body))  # say, copied by hand and cut short
    status, cached, err = _info(capsys)
    assert (status, cached) == (1, "damaged")
    assert re.search(f"{cache_path(ENTRY)} {reason}" if damage != "other_variant" else reason, err), err
    assert "`revcol download revcol_test in1k` fetches it again" in err
    server = serve()
    assert main(["download", "revcol_test"]) == 0  # not "cached": fetched again, checked, then reported
    out, err = capsys.readouterr()
    assert out.strip() == str(cache_path(ENTRY)) and "downloading it again" in err
    assert cache_path(ENTRY).read_bytes() == body and server.requests == {SERVED: 1}
    assert _info(capsys)[:2] == (0, "yes")


@pytest.mark.usefixtures("small_variant")
def test_download_of_a_damaged_file_offline_fails_and_keeps_it(capsys):
    from revcol.cli import main

    cache_path(ENTRY).parent.mkdir(parents=True)
    cache_path(ENTRY).write_bytes(b"")
    assert main(["download", "revcol_test"]) == 1
    err = capsys.readouterr().err
    assert "downloading it again" in err and "could not download revcol_test_1k.pth" in err
    assert cache_path(ENTRY).read_bytes() == b""  # nothing better arrived, so nothing was replaced


@pytest.mark.usefixtures("small_variant")
def test_info_and_download_with_a_directory_at_the_cache_path(serve, capsys):
    from revcol.cli import main

    server = serve()
    cache_path(ENTRY).mkdir(parents=True)
    status, cached, err = _info(capsys)
    assert (status, cached) == (1, "damaged") and f"{cache_path(ENTRY)} is a directory" in err
    assert main(["download", "revcol_test"]) == 1
    assert f"the weights cache has a directory at {cache_path(ENTRY)}" in capsys.readouterr().err
    assert server.requests == {}
