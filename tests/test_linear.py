"""The oneDNN product behind every projection equals `F.linear`, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from eeyore.model.linear import ONEDNN, linear, pack_weight, uses_onednn


def test_the_cpu_wheel_has_onednn():
    # CI's torch wheel ships oneDNN; without it the tests below would only compare F.linear with itself.
    assert ONEDNN


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 7, 64), (517, 64)])
def test_inference_equals_f_linear(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(96, 64)
    assert uses_onednn(x, w)
    with torch.inference_mode():
        out = linear(x, w)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_non_contiguous_input():
    torch.manual_seed(0)
    x, w = torch.randn(64, 5).t(), torch.randn(96, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_gradients_equal_f_linear():
    torch.manual_seed(0)
    x, w, g = torch.randn(2, 9, 64), torch.randn(96, 64), torch.randn(2, 9, 96)
    ours = [t.clone().requires_grad_() for t in (x, w)]
    ref = [t.clone().requires_grad_() for t in (x, w)]
    out = linear(*ours)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    out.backward(g)
    F.linear(*ref).backward(g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


def test_only_the_input_needs_a_gradient():
    x, w = torch.randn(4, 64, requires_grad=True), torch.randn(96, 64)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, -1), rtol=1e-5, atol=1e-4)


def test_other_dtypes_and_empty_inputs_take_f_linear():
    w = torch.randn(96, 64)
    assert not uses_onednn(torch.randn(2, 64, dtype=torch.bfloat16), w.bfloat16())
    assert not uses_onednn(torch.randn(0, 64), w)
    assert linear(torch.randn(0, 64), w).shape == (0, 96)


def test_packed_weight_gives_the_same_products():
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 64), torch.randn(96, 64)
    packed = pack_weight(w)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="no gradient"):
        linear(x.requires_grad_(), packed)
