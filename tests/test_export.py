"""Deployment formats a CPU user exports to, run in their own runtimes and compared with PyTorch's eval outputs.

Through Ultralytics' public entry point (``model.export(format=..., imgsz=64, dynamic=...)`` of a ``.pt``): ONNX
(onnxruntime), TorchScript (``torch.jit.load``) and OpenVINO (``openvino.Core``), for RT-DETR and YOLO heads, at 64
and, for graphs with dynamic shapes, at 96 x 96 and 64 x 96; the bare ``revcol.FullNet`` (RevCol-H's wiring too)
through ``torch.onnx.export``; and static ONNX of the trained ``best.pt`` of every task's tiny model and both tiny
detectors (``helpers.training``). The size tests pin down what each runtime does with an input size the graph cannot
take (README, *Export*): a traced graph cannot run our Python ``InputError`` check.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import pytest
import torch
import ultralytics
from helpers.models import STRIDES, TINY_CONFIG
from helpers.training import DETECTORS, TASKS
from helpers.yamls import IMGSZ, TINY_RTDETR_YAML, TINY_YOLO_YAML
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException
from ultralytics import RTDETR, YOLO
from ultralytics.utils.checks import check_version

from revcol import FullNet, InputError, RevColBackbone
from revcol.diagnostics import randomize_

# float32 rounding only (every runtime computes in float32 here), as in test_e2e. YOLO's box rows are pixel
# coordinates, and with randomized weights some reach the hundreds, where one float32 step is already ~6e-5: the
# relative term (1e-5, about 80 steps) covers those; RT-DETR's outputs are in [0, 1] and meet the absolute 1e-4.
ATOL, RTOL = 1e-4, 1e-5
# OpenVINO's CPU plugin computes in bfloat16 by default on CPUs that have it (AMX or AVX512-BF16, as this machine),
# which moves outputs by up to ~1 (measured): parity is only defined for its float32 mode.
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}
# Before 8.4.146 RT-DETR's decoder normalised its anchors by a torch.tensor of the feature sizes, which tracing
# freezes: a dynamic RT-DETR graph gives wrong boxes (by up to 2, measured) at any size but the export size.
RTDETR_DYNAMIC_ANCHORS = check_version(ultralytics.__version__, ">=8.4.146")

Runner = Callable[[np.ndarray], np.ndarray]


# Local hardware queries, not installs or downloads: refused like every subprocess, but not counted. Ultralytics'
# first export on a machine whose CPU is not Intel asks xpu-smi for an Intel GPU (to suggest OpenVINO), once per
# settings file, so whether it happens inside this module depends on the CPU and on what ran before.
HARDWARE_PROBES = {"xpu-smi"}


@contextlib.contextmanager
def no_network_or_subprocess() -> Iterator[list[str]]:
    """Refuse (and record) every name look-up, socket connection and subprocess, such as a ``pip install``.

    Ultralytics' export installs missing packages (onnxslim, openvino, ...) with pip and may look things up online;
    with the dev extras installed and ``YOLO_OFFLINE=true`` it must do neither.
    """
    attempts: list[str] = []

    def refuse(what: str) -> Callable[..., None]:
        def refused(*args, **kwargs):
            command = args[0] if what == "subprocess.Popen" and args else None
            if not (isinstance(command, (list, tuple)) and command and command[0] in HARDWARE_PROBES):
                attempts.append(f"{what} {args[:2]!r:.200}")
            raise OSError(f"{what} refused by tests/test_export.py")

        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
        patch.setattr(socket.socket, "connect", refuse("socket.connect"))
        patch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
        yield attempts


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _first(output) -> torch.Tensor:
    """The detections: Ultralytics' eval forward returns ``(y, extras)``, exported graphs only ``y``."""
    return output[0] if isinstance(output, (list, tuple)) else output


def _assert_matches(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _onnx_runner(path: str) -> Runner:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _torchscript_runner(path: str) -> Runner:
    module = torch.jit.load(path)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _first(module(torch.from_numpy(x))).numpy()

    return run


def _openvino_runner(folder: str) -> Runner:
    (xml,) = Path(folder).glob("*.xml")
    compiled = openvino.Core().compile_model(str(xml), "CPU", OPENVINO_F32)
    return lambda x: compiled(x)[0]


RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner, "openvino": _openvino_runner}
# (model, format, dynamic): what is exported once per module. Static ONNX only for the size checks (its parity is
# test_e2e's); OpenVINO with dynamic shapes for YOLO only, as each OpenVINO export takes ~6 s here (~1 s the others).
EXPORTS = [
    ("rtdetr", "onnx", True),
    ("rtdetr", "torchscript", False),
    ("rtdetr", "torchscript", True),
    ("rtdetr", "openvino", False),
    ("yolo", "onnx", True),
    ("yolo", "onnx", False),
    ("yolo", "torchscript", False),
    ("yolo", "torchscript", True),
    ("yolo", "openvino", False),
    ("yolo", "openvino", True),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A ``.pt`` per head, as ``Model.save`` writes it, whose backbone has random non-trivial weights.

    With the paper's layer scale (1e-6) a freshly built or briefly trained backbone's ConvNeXt blocks add almost
    nothing, and an export that got them wrong would still match; randomized weights make every block count.
    """
    root = tmp_path_factory.mktemp("export")
    files = {}
    for name, cls, yaml in (("rtdetr", RTDETR, TINY_RTDETR_YAML), ("yolo", YOLO, TINY_YOLO_YAML)):
        (root / f"{name}.yaml").write_text(yaml)
        model = cls(str(root / f"{name}.yaml"))
        randomize_(model.model.model[0], seed=1)
        files[name] = root / f"{name}.pt"
        model.save(str(files[name]))
    return files


@pytest.fixture(scope="module")
def exported(weights) -> dict[tuple[str, str, bool], Runner]:
    """Every graph of ``EXPORTS``, exported from its ``.pt`` by Ultralytics and loaded in its runtime."""
    runners = {}
    with no_network_or_subprocess() as attempts:
        for name, fmt, dynamic in EXPORTS:
            # Each export writes next to the .pt under a name without the dynamic flag: move it aside first.
            source = weights[name].with_name(f"{name}-{fmt}-{'dynamic' if dynamic else 'static'}.pt")
            source.write_bytes(weights[name].read_bytes())
            model = (RTDETR if name == "rtdetr" else YOLO)(str(source))
            path = model.export(format=fmt, imgsz=IMGSZ, dynamic=dynamic, verbose=False)
            runners[name, fmt, dynamic] = RUNNERS[fmt](str(path))
    assert not attempts, f"export reached for the network or a subprocess: {attempts}"
    return runners


@pytest.fixture(scope="module")
def eager(weights) -> dict[str, torch.nn.Module]:
    """Each ``.pt`` loaded once by Ultralytics, in eval mode: what the exported graphs are compared with."""
    return {name: (RTDETR if name == "rtdetr" else YOLO)(str(path)).model.eval() for name, path in weights.items()}


def _pytorch(eager: dict[str, torch.nn.Module], name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _first(eager[name](torch.from_numpy(x))).numpy()


@pytest.mark.parametrize("name", ["rtdetr", "yolo"])
@pytest.mark.parametrize(("fmt", "dynamic"), [("onnx", True), ("torchscript", False), ("openvino", False)])
def test_export_matches_pytorch_at_export_size(exported, eager, name, fmt, dynamic):
    x = _image(IMGSZ, IMGSZ).numpy()
    _assert_matches(exported[name, fmt, dynamic](x), _pytorch(eager, name, x))


def _rtdetr_dynamic(fmt: str):
    old = pytest.mark.xfail(not RTDETR_DYNAMIC_ANCHORS, reason="Ultralytics < 8.4.146 freezes its anchors", strict=True)
    return pytest.param("rtdetr", fmt, marks=old, id=f"rtdetr-{fmt}")


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        _rtdetr_dynamic("onnx"),
        _rtdetr_dynamic("torchscript"),
        pytest.param("yolo", "onnx", id="yolo-onnx"),
        pytest.param("yolo", "torchscript", id="yolo-torchscript"),
        pytest.param("yolo", "openvino", id="yolo-openvino"),
    ],
)
@pytest.mark.parametrize(("h", "w"), [(96, 96), (64, 96)])
def test_dynamic_export_matches_pytorch_at_other_sizes(exported, eager, name, fmt, h, w):
    x = _image(h, w, seed=1).numpy()
    _assert_matches(exported[name, fmt, True](x), _pytorch(eager, name, x))


@pytest.mark.parametrize(
    ("config", "level0_from_coarsest"),
    [(TINY_CONFIG, False), ({**TINY_CONFIG, "layers": (1, 2, 1, 1)}, True)],
    ids=["plain", "revcol-h-wiring"],
)
def test_fullnet_dynamic_onnx_matches_its_four_outputs(tmp_path, config, level0_from_coarsest):
    """The bare backbone through ``torch.onnx.export`` with dynamic batch and sizes, also RevCol-H's level-3 ->
    level-0 branch (``level0_from_coarsest``)."""
    torch.manual_seed(0)
    net = FullNet(**config, kernel_size=3, level0_from_coarsest=level0_from_coarsest)
    randomize_(net)
    net.eval()
    path = tmp_path / "fullnet.onnx"
    names = ["c0", "c1", "c2", "c3"]
    axes = {"images": {0: "batch", 2: "height", 3: "width"}} | {n: {0: "batch", 2: f"h{n}", 3: f"w{n}"} for n in names}
    torch.onnx.export(
        net, (_image(IMGSZ, IMGSZ),), str(path), input_names=["images"], output_names=names, dynamic_axes=axes,
        dynamo=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in ((1, IMGSZ, IMGSZ), (1, 96, 64), (2, 96, 64), (1, 97, 131), (2, 75, 33)):  # any size
        x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = [c.numpy() for c in net(x)]
        actual = session.run(names, {"images": x.numpy()})
        shapes = [(n, c, h // s, w // s) for c, s in zip(config["channels"], STRIDES, strict=True)]
        assert [a.shape for a in actual] == shapes
        for a, e in zip(actual, expected, strict=True):
            _assert_matches(a, e)


# What a graph exported at 64 does with an input the YOLO head cannot take (96 x 80: its neck concatenates the
# stride-32 map up-sampled, 2 -> 4 columns, with the stride-16 one, 5 columns), per runtime (error type, message
# pattern). Static graphs check their input shape; dynamic ONNX/OpenVINO and traced TorchScript fail at that
# concatenation, with the runtime's own message, not ours: the backbone itself takes the size.
WRONG_SIZE = {
    ("onnx", False): (InvalidArgument, r"Got invalid dimensions for input: images"),
    ("onnx", True): ((Fail, RuntimeException), r"Concat"),  # onnxruntime 1.23 raises the latter
    ("openvino", False): (RuntimeError, r"Can't set the input tensor"),
    ("openvino", True): (RuntimeError, r"Concat"),
    ("torchscript", False): (RuntimeError, r"Sizes of tensors must match except in dimension 1"),
    ("torchscript", True): (RuntimeError, r"Sizes of tensors must match except in dimension 1"),
}


# OpenVINO's CPU plugin checks that broadcast on some processors (seen on an AMX Xeon). On others (seen on an AMD
# EPYC) it raises nothing and returns an empty output, shape (0, 7, 0), or one of the shape of an earlier input
# (126 anchors: the 64 x 96 image run before): never a result that could be taken for this input's.
EMPTY_ON_SOME_CPUS = {("openvino", True)}


@pytest.mark.parametrize(("fmt", "dynamic"), list(WRONG_SIZE))
def test_a_size_the_head_cannot_join_fails_in_every_runtime(exported, eager, fmt, dynamic):
    h, w = 96, 80
    x = _image(h, w).numpy()
    with pytest.raises(InputError, match="multiples of 32"):
        _pytorch(eager, "yolo", x)
    error, message = WRONG_SIZE[fmt, dynamic]
    if (fmt, dynamic) in EMPTY_ON_SOME_CPUS:
        try:
            output = exported["yolo", fmt, dynamic](x)
        except error as raised:
            assert re.search(message, str(raised)), raised
        else:  # no error, and no output of the shape a result at this size would have
            anchors = sum((h // stride) * (w // stride) for stride in (8, 16, 32))
            assert output.shape[-1] != anchors, output.shape
        return
    with pytest.raises(error, match=message):
        exported["yolo", fmt, dynamic](x)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torchscript"])
def test_dynamic_graphs_compute_an_odd_size_the_head_can_join(exported, eager, fmt, monkeypatch):
    """At 100 x 100 the floored maps (25, 12, 6, 3) line up in the YOLO neck: a dynamic graph returns what the
    network computes at that size, which eager Ultralytics refuses only by its letterbox contract (lifted here)."""
    x = _image(100, 100).numpy()
    with pytest.raises(InputError, match="multiples of 32"):
        _pytorch(eager, "yolo", x)
    monkeypatch.setattr(RevColBackbone, "check_input", FullNet.check_input)
    _assert_matches(exported["yolo", fmt, True](x), _pytorch(eager, "yolo", x))


def test_static_torchscript_fails_at_other_multiples_of_32(exported):
    # Without dynamic=True Ultralytics' trace keeps the head's 84 anchors of 64 x 64 (96 x 96 has 189).
    with pytest.raises(RuntimeError, match=r"The size of tensor a \(84\) must match the size of tensor b \(189\)"):
        exported["yolo", "torchscript", False](_image(96, 96).numpy())


@pytest.mark.parametrize(
    ("fmt", "dynamic"), [("onnx", True), ("openvino", True), ("torchscript", True), ("torchscript", False)]
)
def test_one_to_three_extra_rows_or_columns_are_ignored(exported, eager, fmt, dynamic):
    # The stride-4 stem (kernel 4) floors 65..67 to the same 16 positions as 64: such graphs run without an error and
    # give the result of the input cropped to 64 x 64, which eager PyTorch refuses.
    x = _image(IMGSZ + 1, IMGSZ + 3).numpy()
    _assert_matches(exported["yolo", fmt, dynamic](x), _pytorch(eager, "yolo", x[..., :IMGSZ, :IMGSZ]))


# --------------------------------------------------------------------------- trained best.pt files, static ONNX


def _eval_outputs(output) -> list[torch.Tensor]:
    """The tensors an export returns, from an eval-mode forward: ``(y, raw)`` or ``((y, proto), raw)``."""
    head = output[0] if isinstance(output, (list, tuple)) else output
    return list(head) if isinstance(head, (list, tuple)) else [head]


@pytest.mark.parametrize("name", [*DETECTORS, *TASKS])
def test_trained_best_pt_onnx_matches_pytorch(trained, name):
    """The ``best.pt`` of each tiny model that ``test_e2e``/``test_tasks`` train (every task, both detectors)."""
    run = trained(name)
    path = run.model.__class__(str(run.best)).export(format="onnx", imgsz=IMGSZ, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    onnx_outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = run.model.__class__(str(run.best)).model.eval()
    if run.task is not None and run.task.name in {"semantic", "depth"}:  # graphs end upsampled (semantic: class map)
        model.model[-1].export, model.model[-1].format = True, "onnx"
    with torch.no_grad():
        torch_outputs = _eval_outputs(model(x))
    assert len(onnx_outputs) == len(torch_outputs)
    for actual, expected in zip(onnx_outputs, torch_outputs, strict=True):
        assert actual.shape == tuple(expected.shape)
        if np.issubdtype(expected.numpy().dtype, np.integer):  # semantic's class map (8.4.67 exports the logits)
            assert actual.dtype == expected.numpy().dtype and np.mean(actual != expected.numpy()) <= 1e-3
        else:
            assert np.abs(actual - expected.numpy()).max() <= 1e-4
