"""Each Triton kernel against its plain PyTorch reference, run by Triton's interpreter on CPU.

Fresh random inputs every run, sizes that are not multiples of any block, and every buffer a
kernel allocates filled with NaN first, so an element a kernel forgets to write fails the test.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import _triton, apply_rope, linear_cross_entropy, reference, rms_norm, swiglu  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1",
                                reason="the interpreter tests run on CPU tensors")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_triton, "empty", nan_empty)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def grads(fn, *inputs: torch.Tensor, upstream=None):
    """Outputs of fn(*inputs) and the gradients of sum(out * upstream) w.r.t. each input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    upstream = upstream or [torch.randn_like(o) for o in outs]
    sum((o * u).sum() for o, u in zip(outs, upstream)).backward()
    return [o.detach() for o in outs], [t.grad for t in inputs], upstream


def test_rms_norm_matches_hf_forward_and_backward():
    x, w = torch.randn(3, 5, 37), torch.randn(37)  # 15 rows, 37 columns: no power of two
    out, g, up = grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    ref_out, ref_g, _ = grads(lambda a, b: reference.rms_norm(a, b, 1e-6), x, w, upstream=up)
    close(out[0], ref_out[0])
    for a, b in zip(g, ref_g):
        close(a, b)


@pytest.mark.parametrize("cos_batch", [1, 2])
def test_apply_rope_matches_rotate_half(cos_batch):
    B, T, D = 2, 7, 12  # head_dim 12: a half of 6 is padded to a block of 8
    # The model hands over transposed [B, T, heads, D] projections: strided inputs.
    q = torch.randn(B, T, 5, D).transpose(1, 2)
    k = torch.randn(B, T, 3, D).transpose(1, 2)
    angles = torch.randn(cos_batch, 1, T, D // 2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    out, g, up = grads(lambda a, b: apply_rope(a, b, cos, sin), q, k)
    ref_out, ref_g, _ = grads(lambda a, b: reference.apply_rope(a, b, cos, sin), q, k, upstream=up)
    for a, b in zip(out + g, ref_out + ref_g):
        close(a, b)


def test_swiglu_matches_silu_times_up():
    gate, up = torch.randn(3, 1500) * 4, torch.randn(3, 1500)  # 4500 elements: blocks of 1024 plus a rest
    out, g, upstream = grads(swiglu, gate, up)
    ref_out, ref_g, _ = grads(reference.swiglu, gate, up, upstream=upstream)
    for a, b in zip(out + g, ref_out + ref_g):
        close(a, b)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_cross_entropy_matches_full_logits(reduction, monkeypatch):
    module = importlib.import_module("kernels.linear_cross_entropy")  # the function shadows the module name

    monkeypatch.setattr(module, "_slice_rows", lambda vocab, itemsize: 5)  # several slices, the last short
    N, H, V = 23, 16, 1100  # V spans two vocabulary blocks of 1024, the second partly
    hidden, weight = torch.randn(N, H), torch.randn(V, H) / 4
    targets = torch.randint(0, V, (N,))
    targets[torch.randperm(N)[:6]] = -100
    up = [torch.tensor(0.7)]
    out, g, _ = grads(lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction), hidden, weight, upstream=up)
    ref_out, ref_g, _ = grads(lambda h, w: reference.linear_cross_entropy(h, w, targets, reduction=reduction), hidden, weight, upstream=up)
    close(out[0], ref_out[0])
    for a, b in zip(g, ref_g):
        close(a, b)
    assert (g[0][targets == -100] == 0).all()


def test_linear_cross_entropy_custom_ignore_index_and_no_grad():
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (9,))
    targets[:3] = 7  # 7 is the ignored id here
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, ignore_index=7, reduction="mean")
    close(loss, F.cross_entropy(hidden @ weight.t(), targets, ignore_index=7))


def test_all_targets_ignored_gives_zero_mean_loss():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(30, 8), torch.full((4,), -100), reduction="mean")
    loss.backward()
    assert loss.item() == 0 and (hidden.grad == 0).all()


def test_kernels_reject_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 6), torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), reduction="none")


def test_import_without_triton_raises_a_clear_error_on_call(tmp_path):
    import subprocess
    import sys

    # A `triton` package that fails to import, first on the path: as if it were not installed.
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton here')\n")
    code = (
        "import torch, kernels\n"
        "try:\n    kernels.swiglu(torch.ones(2), torch.ones(2))\n"
        "except kernels.KernelsUnavailable as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("ERR kernels: triton is not installed") and "pip install triton" in out


def test_training_loss_runs_the_kernel_when_selected():
    from eeyore.train import loss

    hidden, weight = torch.randn(2, 9, 16), torch.randn(70, 16)
    targets = torch.randint(0, 70, (2, 9))
    targets[0, :4] = loss.IGNORE_INDEX
    expected, expected_grads, up = grads(lambda h, w: loss.cross_entropy_sum(h, w, targets)[0], hidden, weight)
    loss.use_kernels("on")
    try:
        assert loss._fused(hidden)
        got, got_grads, _ = grads(lambda h, w: loss.cross_entropy_sum(h, w, targets)[0], hidden, weight, upstream=up)
    finally:
        loss.use_kernels("auto")
    assert not loss._fused(hidden)  # auto: the Triton loss is for CUDA tensors only
    for a, b in zip(got + got_grads, expected + expected_grads):
        close(a, b)


def test_triton_imported_before_the_interpreter_was_on_is_a_clear_error():
    import subprocess
    import sys

    code = (
        "import triton, torch, kernels\n"
        "try:\n    kernels.swiglu(torch.ones(2), torch.ones(2))\n"
        "except kernels.KernelsUnavailable as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("ERR kernels: CPU tensors need Triton's interpreter")


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any operation returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("side", ["triton", "chunked"])
def test_bf16_fused_loss_is_close_and_never_holds_an_fp32_weight_gradient(side, monkeypatch):
    """Both fused losses in bf16, over several slices: loss and both gradients within 1e-2 of
    the fp32 reference, and no tensor as large as an fp32 [V, H] accumulator is ever made."""
    from eeyore.train import loss

    module = importlib.import_module("kernels.linear_cross_entropy")
    monkeypatch.setattr(module, "_slice_rows", lambda vocab, itemsize: 8)
    N, H, V = 45, 64, 1100  # six slices of logits [8, V]: each smaller than the bf16 [V, H] gradient
    hidden, weight = torch.randn(N, H).bfloat16(), (torch.randn(V, H) / 4).bfloat16()
    targets = torch.randint(0, V, (N,))
    targets[:5] = -100
    if side == "triton":
        fn = lambda h, w: linear_cross_entropy(h, w, targets)  # noqa: E731
    else:
        fn = lambda h, w: loss.cross_entropy_sum(h, w, targets, rows_per_block=8)[0]  # noqa: E731
        monkeypatch.setattr(loss, "_fused", lambda hidden: False)
    up = [torch.tensor(0.7)]
    with _LargestTensor() as seen:
        out, g, _ = grads(fn, hidden, weight, upstream=up)
    ref_out, ref_g, _ = grads(lambda h, w: reference.linear_cross_entropy(h, w, targets), hidden.float(), weight.float(), upstream=up)
    assert g[1].dtype == torch.bfloat16 and seen.largest < V * H * 4
    for a, b in zip(out + g, ref_out + ref_g):
        assert float((a.float() - b).norm() / b.norm()) < 1e-2
