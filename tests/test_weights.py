"""Published weights (revcol.weights): the table, the cache, downloads from a local server, what ``pretrained=`` means.

Nothing here reaches the internet: every test runs with ``REVCOL_WEIGHTS_URL`` pointing at 127.0.0.1 (a
closed port unless the test serves files) and name look-ups of any other host fail.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from revcol_helpers import TINY_CHANNELS, TINY_RTDETR_YAML, WeightsServer, make_net, revcol_env

import revcol
from revcol import CheckpointError, FullNet, VariantSpec, load_pretrained
from revcol.checkpoints.files import read_checkpoint
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published
from revcol.weights.cache import cache_path, download, is_cached
from revcol.weights.pretrained import resolve
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEST_ENTRY = PublishedWeights("revcol_test", "in1k", "revcol_test_1k.pth", 224, 80.0, 1000)
SERVED_PATH = f"/weights/{TEST_ENTRY.filename}"
RELEASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"
MIRROR = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/classification/"
LOCAL_HOSTS = ("127.0.0.1", "localhost")

# The authors' README: (variant, tag) -> file, training resolution, ImageNet-1k top-1, classes of its heads.
EXPECTED_TABLE = {
    ("revcol_tiny", "in1k"): ("revcol_tiny_1k.pth", 224, 82.2, 1000),
    ("revcol_small", "in1k"): ("revcol_small_1k.pth", 224, 83.5, 1000),
    ("revcol_base", "in1k"): ("revcol_base_1k.pth", 224, 84.1, 1000),
    ("revcol_base", "in22k"): ("revcol_base_22k.pth", 224, None, 21841),
    ("revcol_base", "in22k_ft_in1k"): ("revcol_base_22k_1kft_224.pth", 224, 85.6, 1000),
    ("revcol_base", "in22k_ft_in1k_384"): ("revcol_base_22k_1kft_384.pth", 384, 86.7, 1000),
    ("revcol_large", "in22k"): ("revcol_large_22k.pth", 224, None, 21841),
    ("revcol_large", "in22k_ft_in1k"): ("revcol_large_22k_1kft_224.pth", 224, 86.6, 1000),
    ("revcol_large", "in22k_ft_in1k_384"): ("revcol_large_22k_1kft_384.pth", 384, 87.6, 1000),
    # RevCol-H: MegData-168M pretraining (its classes are not published), then ImageNet-1k at 640
    ("revcol_huge", "megdata"): ("revcol_huge_megdata.pth", 224, None, None),
    ("revcol_huge", "megdata_ft_in1k"): ("revcol_huge_megdata_in1k.pth", 640, 90.0, 1000),
    # Downstream (their Detection/README.md and Segmentation/README.md): COCO at test scale 800, ADE20K crops
    ("revcol_tiny", "in1k_ft_coco"): ("cmr_tiny_3x_in1k_AP508.pth", 800, None, None),
    ("revcol_small", "in1k_ft_coco"): ("cmr_revcol_small_3x_in1k.pth", 800, None, None),
    ("revcol_base", "in1k_ft_coco"): ("cmr_base_3x_in1k.pth", 800, None, None),
    ("revcol_base", "in22k_ft_coco"): ("cmr_base_3x_in22k_AP55.pth", 800, None, None),
    ("revcol_large", "in22k_ft_coco"): ("cmr_large_3x_in22k_AP559.pth", 800, None, None),
    ("revcol_tiny", "in1k_ft_ade20k"): ("upernet_revcol_tiny_fp16_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_small", "in1k_ft_ade20k"): ("upernet_revcol_small_fp16_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_base", "in1k_ft_ade20k"): ("upernet_revcol_base_512x512_160k_ade20k.pth", 512, None, None),
    ("revcol_base", "in22k_ft_ade20k"): ("upernet_revcol_base_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_large", "in22k_ft_ade20k"): ("upernet_revcol_large_fp16_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_huge", "megdata_ft_ade20k"): ("upernet_revcol_huge_fp16_640x640_160k_ade20k.pth", 640, None, None),
    ("revcol_huge", "megdata_k7"): ("revcol_huge_k7padded.pth", 224, None, None),
}
MIRROR_ONLY = {"revcol_huge_megdata.pth", "revcol_huge_megdata_in1k.pth"}  # not in the GitHub release


# --------------------------------------------------------------------------- a local weights server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> str:
    """Every test: torch's cache in tmp_path, weights from a closed local port, no other host reachable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    closed = f"http://127.0.0.1:{_closed_port()}/weights"
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", closed)
    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise OSError(f"the test tried to reach {host!r}; only 127.0.0.1 is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    return closed


@pytest.fixture(scope="module")
def checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file in the authors' layout (``model``, with intermediate-supervision heads) and its backbone tensors."""
    backbone = make_net(num_subnet=2, dtype=torch.float32, seed=5).state_dict()
    heads = {
        "cls_blocks.0.weight": torch.randn(10, 32),
        "cls_blocks.0.bias": torch.randn(10),
        "decoder_blocks.0.conv.weight": torch.randn(3, 8, 1, 1),
    }
    buffer = io.BytesIO()
    torch.save({"model": {**backbone, **heads}}, buffer)
    return buffer.getvalue(), backbone


@pytest.fixture
def test_variant(monkeypatch) -> None:
    """A small variant with one published file, so that downloads stay tiny."""
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", VariantSpec(TINY_CHANNELS, (1, 1, 1, 1), 2, 0.1))
    monkeypatch.setitem(WEIGHTS, "revcol_test", {"in1k": TEST_ENTRY})
    monkeypatch.setitem(DEFAULT_TAGS, "revcol_test", "in1k")


@pytest.fixture
def serving(server, checkpoint, monkeypatch) -> WeightsServer:
    """The server holds the test checkpoint and REVCOL_WEIGHTS_URL points at it."""
    server.files[SERVED_PATH] = (checkpoint[0], "ok")
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    return server


def _cache_files() -> list[str]:
    folder = weights_cache.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- the table, as data


def test_table_maps_each_tag_to_the_authors_file():
    table = {
        (v, t): (e.filename, e.resolution, e.top1, e.num_classes)
        for v, tags in WEIGHTS.items()
        for t, e in tags.items()
    }
    assert table == EXPECTED_TABLE
    for variant, tags in WEIGHTS.items():
        assert variant in revcol.VARIANTS
        assert all(e.variant == variant and e.tag == tag for tag, e in tags.items())
    assert "revcol_xlarge" not in WEIGHTS  # no published file


def test_default_tags_are_the_224px_in1k_classifiers():
    assert DEFAULT_TAGS == {
        "revcol_tiny": "in1k",
        "revcol_small": "in1k",
        "revcol_base": "in22k_ft_in1k",
        "revcol_large": "in22k_ft_in1k",
        "revcol_huge": "megdata_ft_in1k",  # its only ImageNet-1k classifier, fine-tuned at 640
    }
    for variant, tag in DEFAULT_TAGS.items():
        assert WEIGHTS[variant][tag].resolution == (640 if variant == "revcol_huge" else 224)
        assert WEIGHTS[variant][tag].num_classes == 1000


def test_urls_release_then_mirror_unless_overridden(monkeypatch):
    entry = WEIGHTS["revcol_base"]["in22k_ft_in1k_384"]
    assert entry.url == RELEASE + "revcol_base_22k_1kft_384.pth"
    assert entry.mirror_url == MIRROR + "revcol_base_22k_1kft_384.pth"
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", "http://127.0.0.1:1/some/mirror/")
    assert weights_cache.candidate_urls(entry) == ["http://127.0.0.1:1/some/mirror/revcol_base_22k_1kft_384.pth"]
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    assert weights_cache.candidate_urls(entry) == [entry.url, entry.mirror_url]


def test_each_entry_has_its_source_release_then_mirror_or_mirror_only(monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    # the downstream files (mirror-only too, in other folders): tests/test_downstream_weights.py
    for entry in (e for tags in WEIGHTS.values() for e in tags.values() if not e.is_downstream):
        mirror = MIRROR + entry.filename
        if entry.filename in MIRROR_ONLY:
            assert not entry.in_release and weights_cache.candidate_urls(entry) == [mirror] == [entry.url]
        else:
            assert entry.in_release and weights_cache.candidate_urls(entry) == [RELEASE + entry.filename, mirror]


def test_a_mirror_only_file_is_never_asked_of_the_release(server, checkpoint, monkeypatch):
    """pretrained=True for revcol_huge: its default file, fetched from the mirror and nowhere else."""
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", server.base + "/release/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/mirror/")
    server.files["/weights/mirror/revcol_huge_megdata_in1k.pth"] = (checkpoint[0], "ok")
    path = resolve("revcol_huge", True)
    assert path == cache_path(WEIGHTS["revcol_huge"]["megdata_ft_in1k"]) and path.read_bytes() == checkpoint[0]
    assert dict(server.requests) == {"/weights/mirror/revcol_huge_megdata_in1k.pth": 1}


def test_cache_path_follows_torch_home(tmp_path):
    entry = WEIGHTS["revcol_tiny"]["in1k"]
    assert cache_path(entry) == tmp_path / "torch" / "hub" / "checkpoints" / "revcol_tiny_1k.pth"
    assert not is_cached(entry)
    cache_path(entry).parent.mkdir(parents=True)
    cache_path(entry).write_bytes(b"placed by hand")
    assert is_cached(entry)


# --------------------------------------------------------------------------- downloads


def test_download_lands_in_the_hub_cache_under_the_authors_name(serving, checkpoint, capsys):
    path = download(TEST_ENTRY)
    assert path == cache_path(TEST_ENTRY) and path.name == "revcol_test_1k.pth"
    assert path.read_bytes() == checkpoint[0]
    state = read_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in checkpoint[1].items())
    assert _cache_files() == [TEST_ENTRY.filename]
    assert serving.requests == {SERVED_PATH: 1}
    assert "Downloading" in capsys.readouterr().err  # progress=True reports like torch.hub


def test_cached_file_is_reused_without_a_request(serving, monkeypatch):
    first = download(TEST_ENTRY, progress=False)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", f"http://127.0.0.1:{_closed_port()}")  # would fail if it were asked
    assert download(TEST_ENTRY, progress=False) == first
    assert serving.requests == {SERVED_PATH: 1}


def test_a_copy_placed_by_hand_is_used(checkpoint):
    cache_path(TEST_ENTRY).parent.mkdir(parents=True)
    cache_path(TEST_ENTRY).write_bytes(checkpoint[0])
    assert download(TEST_ENTRY) == cache_path(TEST_ENTRY)  # the default URL is a closed port: no request made


def _failed_download(url_base: str) -> str:
    with pytest.raises(CheckpointError) as info:
        download(TEST_ENTRY, progress=False)
    message = str(info.value)
    assert TEST_ENTRY.filename in message
    assert f"{url_base}/{TEST_ENTRY.filename}" in message
    assert str(cache_path(TEST_ENTRY)) in message  # where a copy downloaded by hand goes
    assert ".part" not in message
    assert _cache_files() == []  # nothing under the final name, no partial file
    return message


@pytest.mark.parametrize(
    ("body", "mode", "reason"),
    [
        (None, "ok", r"HTTP 404"),
        ("checkpoint", "truncate", r"truncated: got \d+ of \d+ bytes"),
        (b"<html><body>Not here</body></html>\n", "ok", "revcol_test_1k.pth is not a PyTorch checkpoint"),
        ("half", "ok", "revcol_test_1k.pth is not a readable PyTorch checkpoint"),
        ("no_backbone", "ok", "revcol_test_1k.pth holds no RevCol backbone tensors"),
    ],
    ids=["404", "truncated_body", "html_page", "corrupt_file", "not_revcol"],
)
def test_broken_download_leaves_nothing(body, mode, reason, server, checkpoint, monkeypatch):
    data = checkpoint[0]
    if body == "no_backbone":
        buffer = io.BytesIO()
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, buffer)
        data = buffer.getvalue()
    served = {"checkpoint": data, "half": data[: len(data) // 2], "no_backbone": data}.get(body, body)
    if served is not None:
        server.files[SERVED_PATH] = (served, mode)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base + "/")  # a trailing slash is fine
    message = _failed_download(server.base)
    assert re.search(reason, message), message
    if mode == "truncate":
        assert f"got {len(data) // 2} of {len(data)} bytes" in message


def test_server_not_running(offline):
    message = _failed_download(offline)
    assert "Connection refused" in message


def test_a_stalled_server_times_out(server, checkpoint, monkeypatch):
    server.files[SERVED_PATH] = (checkpoint[0], "stall")
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 0.3)
    start = time.monotonic()
    assert "no answer within 0.3 s" in _failed_download(server.base)
    assert time.monotonic() - start < 3


def test_release_missing_falls_back_to_the_mirror(server, checkpoint, monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", f"http://127.0.0.1:{_closed_port()}/release/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/")
    server.files[SERVED_PATH] = (checkpoint[0], "ok")
    assert download(TEST_ENTRY, progress=False).read_bytes() == checkpoint[0]


def test_every_url_tried_is_reported(server, monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    release = f"http://127.0.0.1:{_closed_port()}/release"
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", release + "/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/")
    message = _failed_download(release)
    lines = message.splitlines()
    assert lines[1] == f"  {release}/{TEST_ENTRY.filename}: Connection refused"
    assert lines[2] == f"  {server.base}/{TEST_ENTRY.filename}: HTTP 404 Not Found"


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "not_a_folder"))
    with pytest.raises(CheckpointError, match=r"cannot write to the weights cache .*set TORCH_HOME"):
        download(TEST_ENTRY)


CHILD = f"""
from revcol.weights.published import PublishedWeights
from revcol.weights.cache import download
print(download(PublishedWeights(**{asdict(TEST_ENTRY)!r}), progress=False))
"""


def test_two_processes_downloading_at_once_end_with_one_good_file(server, checkpoint, tmp_path):
    server.files[SERVED_PATH] = (checkpoint[0], "slow")
    server.gate = threading.Barrier(2, timeout=30)  # neither body starts before both requests are in
    env = revcol_env(tmp_path) | {"TORCH_HOME": str(tmp_path / "torch"), "REVCOL_WEIGHTS_URL": server.base}
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    # the last line: Ultralytics may print a note when it first creates its settings file
    outputs = [child.communicate(timeout=90)[0].splitlines()[-1] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs == [str(cache_path(TEST_ENTRY))] * 2
    assert server.peak == 2 and server.requests == {SERVED_PATH: 2}  # they really overlapped
    assert cache_path(TEST_ENTRY).read_bytes() == checkpoint[0]
    assert _cache_files() == [TEST_ENTRY.filename]  # no temporary file left behind
    log = tmp_path / "network.log"  # the children, importing revcol and downloading, reached only 127.0.0.1
    assert all("127.0.0.1" in line for line in log.read_text().splitlines())


# --------------------------------------------------------------------------- resolve: what pretrained= means


@pytest.mark.usefixtures("test_variant")
@pytest.mark.parametrize("pretrained", [True, "in1k"])
def test_true_and_tags_download_and_load(pretrained, serving, checkpoint):
    path = resolve("revcol_test", pretrained)
    assert path == cache_path(TEST_ENTRY)
    model = FullNet(**revcol.VARIANTS["revcol_test"].fullnet_kwargs())
    result = load_pretrained(model, path)
    assert sorted(result.skipped) == ["cls_blocks.0.bias", "cls_blocks.0.weight", "decoder_blocks.0.conv.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint[1].items())


@pytest.mark.usefixtures("test_variant")
def test_a_tag_wins_over_a_file_of_that_name(serving, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in1k").write_bytes(b"not this one")
    assert resolve("revcol_test", "in1k") == cache_path(TEST_ENTRY)
    assert serving.requests == {SERVED_PATH: 1}


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


@pytest.mark.usefixtures("test_variant")
@pytest.mark.parametrize("pretrained", [True, "in1k"])
def test_variant_builder_takes_true_or_a_tag(pretrained, serving, checkpoint):
    model = revcol.build_variant("revcol_test", pretrained=pretrained)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint[1].items())
    assert serving.requests[SERVED_PATH] == 1


@pytest.mark.usefixtures("test_variant")
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


@pytest.mark.usefixtures("test_variant")
def test_cli_download_fills_the_cache_and_info_says_so(serving, capsys):
    from revcol.cli import main

    def info_row() -> list[str]:
        assert main(["info", "revcol_test"]) == 0
        return next(line.split() for line in capsys.readouterr().out.splitlines() if "revcol_test_1k.pth" in line)

    assert info_row() == ["revcol_test", "in1k", "*", "revcol_test_1k.pth", "224", "80.0", "1000", "no"]
    assert main(["download", "revcol_test"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_path(TEST_ENTRY))
    assert info_row()[-1] == "yes"
    assert main(["download", "revcol_test", "in22k"]) == 2
    assert "has no published weights tagged 'in22k'; tags: in1k" in capsys.readouterr().err
