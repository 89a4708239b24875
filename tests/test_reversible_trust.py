"""The reversible path must never be silently wrong: threads, fast weights, double backward, fused optimizers.

Each test here failed on the code before the fix (docs/design.md, "Reversible backward"): the backward then
replayed the shared random generator, recomputed with the module's own parameters, built no second-order
graph and trusted version counters that fused optimizers leave alone.
"""

from __future__ import annotations

import gc
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers.models import assert_close_per_tensor, make_input, make_net
from timm.layers import DropPath

from revcol.core import reversible
from revcol.diagnostics import gradients, output_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def weighted_loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The loss of ``gradients``: every output element weighted by a fixed random number."""
    return sum((o * w.to(o.device)).sum() for o, w in zip(outputs, output_weights(outputs), strict=True))


# --------------------------------------------------------------------------- drop-path masks


def test_drop_path_masks_survive_other_threads_drawing_random_numbers():
    """Two threads train their own model while a third draws random numbers; every reversible gradient equals
    the plain one with the masks the forward drew. (The generator is shared by all threads: replaying its saved
    state in backward gave other masks, relative errors of 0.5 and more.)"""
    x = make_input(2, 32, 32)
    models = [make_net(num_subnet=3, drop_path=0.5, seed=seed) for seed in (0, 1)]
    expected = [gradients(model, x, save_memory=False, seed=10 + index)[1] for index, model in enumerate(models)]
    # Forwards and the third thread's draws take turns, so that each forward draws exactly the masks of its seed,
    # as the plain run did; backwards run freely alongside them.
    lock = threading.Lock()
    done = threading.Event()

    def train(index: int) -> list[dict[str, torch.Tensor]]:
        model = models[index]
        model.save_memory = True
        results = []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            with lock:
                torch.manual_seed(10 + index)
                outputs = model(xx)
            weighted_loss(outputs).backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append({**grads, "input": xx.grad.clone()})
        return results

    def draw() -> None:
        while not done.is_set():
            with lock:
                torch.rand(16)
            time.sleep(0)

    with ThreadPoolExecutor(3) as pool:
        drawing = pool.submit(draw)
        try:
            trained = [pool.submit(train, index) for index in range(2)]
            results = [future.result() for future in trained]
        finally:
            done.set()
        drawing.result()
    for index, runs in enumerate(results):
        for grads in runs:
            assert_close_per_tensor(grads, expected[index], tol=1e-9)


def test_backward_draws_nothing_from_the_generator():
    """The recompute reuses the forward's draws: after forward + backward the generator is where the plain path
    leaves it, and the forward outputs are the plain path's bit for bit."""
    model = make_net(drop_path=0.5)
    x = make_input(4)
    after = {}
    outputs = {}
    for save_memory in (False, True):
        outputs[save_memory], _ = gradients(model, x, save_memory=save_memory, seed=3)
        after[save_memory] = torch.rand(8)
    assert torch.equal(after[True], after[False])
    for a, e in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(a, e)


def test_plain_path_drop_path_is_timms():
    """Outside a reversible column a block's drop-path is timm's DropPath call: same output, same draws."""
    model = make_net(num_subnet=1, drop_path=0.5)
    block = model.subnet0.level3.blocks[0]
    assert type(block.drop_path) is DropPath
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, 4, 4, generator=generator, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    with torch.no_grad():
        actual = block(x)
        after = torch.rand(4)
        torch.manual_seed(0)
        y = block.dwconv(x).permute(0, 2, 3, 1)
        branch = (block.pwconv2(block.act(block.pwconv1(block.norm(y)))) * block.gamma).permute(0, 3, 1, 2)
        expected = x + DropPath(block.drop_path.drop_prob)(branch)
    assert torch.equal(actual, expected)
    assert torch.equal(after, torch.rand(4))


def test_pickled_model_with_timm_drop_path_keeps_exact_gradients():
    """Checkpoints pickle the blocks' timm DropPath; an unpickled model's reversible gradients equal the plain."""
    model = pickle.loads(pickle.dumps(make_net(drop_path=0.5)))
    assert all(type(m) is DropPath for m in model.modules() if hasattr(m, "drop_prob"))
    x = make_input(4)
    _, plain = gradients(model, x, save_memory=False, seed=5)
    _, rev = gradients(model, x, save_memory=True, seed=5)
    assert_close_per_tensor(rev, plain, tol=1e-9)


@pytest.mark.parametrize("new_rate", [0.0, 0.25, 0.75])
def test_drop_path_changed_between_forward_and_backward_raises(new_rate):
    """Switched off, or to another rate: timm rescales a replayed mask by the new rate, so the gradients would be
    wrong (by 22 % at half the rate) without a word."""
    model = make_net(drop_path=0.5)
    outputs = model(make_input(4))
    model.subnet1.level2.blocks[0].drop_path.drop_prob = new_rate
    with pytest.raises(RuntimeError, match="drew differently in the reversible backward"):
        weighted_loss(outputs).backward()


class RandDropPath(torch.nn.Module):
    """A drop-path that draws with ``torch.rand``: the reversible path cannot reuse its draws."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) >= self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


def test_drop_path_module_drawing_otherwise_is_refused():
    model = make_net(drop_path=0.5)
    model.subnet1.level1.blocks[0].drop_path = RandDropPath(0.5)
    with pytest.raises(RuntimeError, match=r"without Tensor\.bernoulli_"):
        model(make_input(4))
    model.save_memory = False
    model(make_input(4))


# --------------------------------------------------------------------------- fast weights


def _meta_gradients(model, save_memory: bool, columns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A first-order MAML step through ``functional_call``: inner gradient step on ``x1`` for the parameters of
    ``columns`` (all of them for ``("",)``), outer loss on ``x2`` with those fast weights; returns the outer
    gradients w.r.t. the fast weights and the original parameters."""
    model.save_memory = save_memory
    params = dict(model.named_parameters())
    inner = weighted_loss(torch.func.functional_call(model, params, (make_input(seed=1),)))
    steps = torch.autograd.grad(inner, list(params.values()))
    fast = {
        name: p - 0.1 * step for (name, p), step in zip(params.items(), steps, strict=True) if name.startswith(columns)
    }
    outer = weighted_loss(torch.func.functional_call(model, fast, (make_input(seed=2),)))
    wrt = [*fast.values(), *params.values()]
    grads = torch.autograd.grad(outer, wrt, allow_unused=True, materialize_grads=True)
    return dict(zip([f"fast.{name}" for name in fast] + list(params), grads, strict=True))


@pytest.mark.parametrize("columns", [("",), ("subnet1.",)], ids=["all", "one-column"])
def test_functional_call_fast_weights_gradients_equal_plain_autograd(columns):
    """The recompute reads the tensors the forward read: ``functional_call``'s, not the module's own."""
    model = make_net(num_subnet=3)
    plain = _meta_gradients(model, False, columns)
    rev = _meta_gradients(model, True, columns)
    assert_close_per_tensor(rev, plain, tol=1e-9)
    assert all(bool(g.abs().sum() > 0) for name, g in plain.items() if name.startswith("fast.subnet1.level"))


# --------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("wrt", ["input", "parameters"])
def test_double_backward_raises_naming_save_memory(wrt):
    """A gradient penalty needs the gradients' own graph, which the reversible backward does not build."""
    model = make_net()
    x = make_input().requires_grad_()
    targets = [x] if wrt == "input" else list(model.parameters())
    model.save_memory = True
    loss = weighted_loss(model(x))
    with pytest.raises(RuntimeError, match=r"save_memory=True\) does not support create_graph=True"):
        torch.autograd.grad(loss, targets, create_graph=True, allow_unused=True)

    model.save_memory = False
    grads = torch.autograd.grad(weighted_loss(model(x)), targets, create_graph=True, allow_unused=True)
    sum(g.square().sum() for g in grads if g is not None).backward()


# --------------------------------------------------------------------------- optimizer steps


class DataSGD(torch.optim.Optimizer):
    """SGD written the old way, through ``p.data``: the parameter's version counter does not move."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.1, foreach=False),
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=0.1, foreach=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
    "adam-capturable": lambda params: torch.optim.Adam(params, lr=0.1, capturable=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "sgd-fused": lambda params: torch.optim.SGD(params, lr=0.1, fused=True),
    "sgd-through-data": lambda params: DataSGD(params, lr=0.1),
}


def _model_and_optimizer(name: str):
    """A tiny float64 model with optimizer ``name``; capturable optimizers run on CUDA only."""
    device = "cuda" if name == "adam-capturable" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("capturable optimizers need an accelerator")
    model = make_net().to(device)
    return model, OPTIMIZERS[name](model.parameters()), device


def _gradients(model, x: torch.Tensor, save_memory: bool) -> dict[str, torch.Tensor]:
    model.save_memory = save_memory
    model.zero_grad(set_to_none=True)
    weighted_loss(model(x)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step_between_forward_and_backward_raises(name):
    """Fused kernels and ``p.data`` updates leave version counters alone: a step pre-hook counts steps instead."""
    model, optimizer, device = _model_and_optimizer(name)
    x = make_input().to(device)
    weighted_loss(model(x)).backward()  # gradients for the step to apply
    outputs = model(x)
    before = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if name in ("adam-fused", "adamw-fused", "sgd-fused", "sgd-through-data"):
        assert [p._version for p in model.parameters()] == versions  # what the version check alone missed
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        weighted_loss(outputs).backward()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step_after_backward_keeps_exact_gradients(name):
    """The usual loop raises nothing, and after steps the reversible gradients still equal the plain ones."""
    model, optimizer, device = _model_and_optimizer(name)
    for seed in range(2):
        optimizer.zero_grad()
        weighted_loss(model(make_input(seed=seed).to(device))).backward()
        optimizer.step()
    x = make_input(seed=5).to(device)
    assert_close_per_tensor(_gradients(model, x, True), _gradients(model, x, False), tol=1e-9)


def test_another_models_optimizer_stepping_in_between_is_fine():
    """A step that updates other parameters (a GAN's discriminator) between forward and backward is allowed."""
    model, other = make_net(), make_net(num_subnet=1, seed=1)
    optimizer = torch.optim.Adam(other.parameters(), fused=True)
    weighted_loss(other(make_input())).backward()
    x = make_input()
    plain = _gradients(model, x, False)
    model.save_memory = True
    model.zero_grad(set_to_none=True)
    outputs = model(x)
    optimizer.step()
    weighted_loss(outputs).backward()
    assert_close_per_tensor({name: p.grad for name, p in model.named_parameters()}, plain, tol=1e-9)


def test_step_counts_do_not_keep_parameters_alive():
    model = make_net(num_subnet=1)
    weighted_loss(model(make_input())).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    counted = set(reversible._OPTIMIZER_STEPS._last)
    ids = {id(p) for p in model.parameters()}
    assert ids <= counted
    del model, optimizer
    gc.collect()
    assert not ids & set(reversible._OPTIMIZER_STEPS._last)
