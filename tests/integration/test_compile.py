"""torch.compile(fullgraph=True) of forward + OnlineKD loss (+ backward) in the loop and batched forms.

The default tests use a tiny CIFAR-style ResNet and the ``aot_eager`` backend: it runs dynamo
(any graph break fails ``fullgraph=True``) and AOTAutograd (the joint forward/backward graph),
which is what can break, without inductor's minutes of C++ code generation on a CPU. The real
models (CIFAR ResNet-32, torchvision resnet18) and inductor are in the ``slow`` tests.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torchvision
from torch._dynamo.testing import CompileCounter

import branchify as bf
from branchify.recipes.zoo import resnet32

from conftest import TinyCifarResNet


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(name: str, factory: Callable[[], torch.nn.Module], batched: bool):
    torch.manual_seed(0)  # the same weights whatever ran before
    model, okd = bf.method(name, factory(), batched=batched)
    okd.set_epoch(3, 10)
    ref_model = copy.deepcopy(model)
    ref_okd = copy.copy(okd)  # the same settings, bound to the copy's aggregator
    ref_model.aggregator = ref_model.aggregator
    return model, okd, ref_model, ref_okd


def _check_matches_eager(name: str, factory: Callable[[], torch.nn.Module], batched: bool, backend: str,
                         size: int = 16, atol: float = 1e-5, grad_rtol: float = 1e-4) -> None:
    model, okd, ref_model, ref_okd = _setup(name, factory, batched)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 5, (4,))
    step = torch.compile(lambda x, y: okd(model(x), y), fullgraph=True, backend=backend)
    got = step(x, y)
    got.total.backward()
    want = ref_okd(ref_model(x), y)
    want.total.backward()
    torch.testing.assert_close(got.total, want.total, atol=atol, rtol=1e-4)
    assert got.parts.keys() == want.parts.keys()
    for k, v in want.parts.items():
        torch.testing.assert_close(got.parts[k], v, atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        assert not got.parts[k].requires_grad
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        assert (p.grad is None) == (ref_params[n].grad is None), n
        if p.grad is not None:
            # Relative to the gradient's size (early layers' gradients are large), plus an
            # absolute floor for gradients that are zero up to rounding (a bias before BatchNorm).
            ref = ref_params[n].grad
            err = (p.grad - ref).norm()
            assert err <= grad_rtol * ref.norm() + atol * ref.numel() ** 0.5, f"grad of {n}: error {err:.2e}"
    ref_sd = ref_model.state_dict()
    for k, v in model.state_dict().items():  # BatchNorm running statistics updated in the graph
        torch.testing.assert_close(v, ref_sd[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


# TSA's loop form traces the same code as ONE's; its batched form adds the nested vmap.
@pytest.mark.parametrize("name, batched", [("one", False), ("one", True), ("tsa", True)],
                         ids=["one-loop", "one-batched", "tsa-batched"])
def test_fullgraph_forward_loss_backward_matches_eager(name, batched):
    _check_matches_eager(name, lambda: TinyCifarResNet(num_classes=5), batched, "aot_eager")


def test_schedule_changes_do_not_recompile():
    model, okd = bf.method("one", TinyCifarResNet(num_classes=5), batched=False)  # the loss is under test
    counter = CompileCounter()
    step = torch.compile(lambda x, y: okd(model(x), y), fullgraph=True, backend=counter)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))
    ramps = []
    for s in range(6):  # a ramp that moves every step (ONE's sigmoid ramp)
        okd.set_step(s, steps_per_epoch=1, total_epochs=30)  # ramp: 8 epochs
        out = step(x, y)
        ramps.append(float(out.parts["ramp"]))
        assert float(out.parts["ramp"]) == pytest.approx(okd.ramp_value())
    assert len(set(ramps)) == 6
    assert counter.frame_count == 1  # the ramp is a tensor input from the first call on


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_compiled_graph_takes_no_python_scalars_and_makes_no_scalar_tensors(batched):
    # What CUDA graphs (mode="reduce-overhead") need: a float graph input is specialised or
    # re-recorded per value, and a scalar tensor created in the graph sits on the CPU.
    model, okd = bf.method("one", TinyCifarResNet(num_classes=5), batched=batched)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda x, y: okd(model(x), y), fullgraph=True, backend=keep)
    for s in range(2):
        okd.set_step(s, steps_per_epoch=1, total_epochs=30)
        step(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)))
    (gm,) = graphs
    inputs = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    assert all(isinstance(v, torch.Tensor) for v in inputs), [type(v).__name__ for v in inputs]
    makers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.tensor, torch.scalar_tensor)]
    assert not makers, makers


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_model_compiles_once(batched):
    # The model must not change state a guard reads (it used to remember its first input inside
    # the compiled call, so the second call compiled everything again).
    model, okd = bf.method("one", TinyCifarResNet(num_classes=5), batched=batched)
    okd.set_epoch(3, 10)  # a fixed ramp: nothing in the loss changes between calls
    counter = CompileCounter()
    step = torch.compile(lambda x, y: okd(model(x), y), fullgraph=True, backend=counter)
    for _ in range(3):
        step(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)))
    assert counter.frame_count == 1
    assert "FLOPs" in model.describe(torch.randn(2, 3, 16, 16))  # given an input, describe() still works


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
@pytest.mark.parametrize("arch", ["resnet32", "resnet18"])
@pytest.mark.parametrize("name", ["one", "tsa"])
def test_real_models_compile_without_graph_breaks(name, arch, batched):
    factory = (lambda: resnet32(num_classes=5)) if arch == "resnet32" else (
        lambda: torchvision.models.resnet18(num_classes=5))
    _check_matches_eager(name, factory, batched, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True], ids=["loop", "batched"])
def test_inductor_resnet32_matches_eager(batched):
    # Inductor reorders float arithmetic (fused BatchNorm, other conv algorithms). Through 31
    # BatchNorm layers at batch 4 the first layers' fp32 gradients carry ~5e-3 relative rounding
    # noise - measured against float64 for eager and inductor alike, plain ResNet-32 included -
    # so gradients are compared at 2e-2 (relative norm), outputs and statistics at 1e-4.
    _check_matches_eager("one", lambda: resnet32(num_classes=5), batched, "inductor", atol=1e-4, grad_rtol=2e-2)
