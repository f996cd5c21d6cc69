"""Every CPU product behind the projections equals `F.linear`, forward and backward, and the
choice between them is the measured one unless forced."""
import pytest
import torch
import torch.nn.functional as F

from eeyore.model import linear as products
from eeyore.model.linear import ONEDNN, linear, pack_weight, uses_onednn


@pytest.fixture(autouse=True)
def plain_products():
    yield
    products.use("blas", "blas")  # the choice is process-wide: leave it as found


def test_the_cpu_wheel_has_onednn():
    # CI's torch wheel ships oneDNN; without it the tests below would only compare F.linear with itself.
    assert ONEDNN


@pytest.mark.parametrize("product", products.PRODUCTS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 7, 64), (517, 64)])
def test_inference_equals_f_linear(shape, product):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(96, 64)
    assert uses_onednn(x, w)
    with torch.inference_mode():
        out = linear(x, pack_weight(w) if product == "packed" else w, product)
    assert out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("product", ["blas", "onednn"])
def test_non_contiguous_input(product):
    torch.manual_seed(0)
    x, w = torch.randn(64, 5).t(), torch.randn(96, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, product), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("product", ["blas", "onednn"])
@pytest.mark.parametrize("rows", [1, 9])
def test_gradients_equal_f_linear(product, rows):
    torch.manual_seed(0)
    x, w, g = torch.randn(2, rows, 64), torch.randn(96, 64), torch.randn(2, rows, 96)
    ours = [t.clone().requires_grad_() for t in (x, w)]
    ref = [t.clone().requires_grad_() for t in (x, w)]
    out = linear(*ours, product)
    assert (type(out.grad_fn).__name__ == "_OneDNNLinearBackward") == (product == "onednn")
    out.backward(g)
    F.linear(*ref).backward(g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)


def test_only_the_input_needs_a_gradient():
    x, w = torch.randn(4, 64, requires_grad=True), torch.randn(96, 64)
    linear(x, w, "onednn").sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, -1), rtol=1e-5, atol=1e-4)


BF16 = pytest.mark.skipif(torch.bfloat16 not in products.DTYPES, reason="this CPU's oneDNN has no bf16")


@BF16
@pytest.mark.parametrize("product", products.PRODUCTS)
@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64), (517, 64)])
def test_bf16_inference_equals_f_linear(shape, product):
    # bf16 F.linear is oneDNN on the plain weight; the packed copy must give the same numbers
    torch.manual_seed(0)
    x, w = torch.randn(shape).bfloat16(), torch.randn(96, 64).bfloat16()
    assert uses_onednn(x, w)
    with torch.inference_mode():
        out = linear(x, pack_weight(w) if product == "packed" else w, product)
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1.6e-2, atol=1e-2)


@BF16
def test_bf16_products_are_chosen_for_inference_only():
    choice = products.choose([(2, 96, 64), (1, 320, 64)], "auto", inference=True, dtype=torch.bfloat16)
    assert choice["few"] in products.PRODUCTS
    assert products.choose([(1, 96, 64)], "packed", dtype=torch.bfloat16)["few"] == "packed"
    with pytest.raises(ValueError, match="inference only"):
        products.choose([(1, 96, 64)], "auto", inference=False, dtype=torch.bfloat16)


def test_other_dtypes_and_empty_inputs_take_f_linear():
    w = torch.randn(96, 64)
    assert not uses_onednn(torch.randn(2, 64, dtype=torch.float16), w.half())
    assert not uses_onednn(torch.randn(2, 64, dtype=torch.bfloat16), w)  # mixed dtypes
    assert products.choose([(1, 96, 64)], "auto", dtype=torch.float16) == {"few": "blas", "many": "blas", "few_plain": "blas"}
    assert not uses_onednn(torch.randn(0, 64), w)
    assert linear(torch.randn(0, 64), w, "onednn").shape == (0, 96)


def test_packed_weight_has_no_gradient():
    x, w = torch.randn(2, 7, 64), torch.randn(96, 64)
    with pytest.raises(RuntimeError, match="no gradient"):
        linear(x.requires_grad_(), pack_weight(w))


def test_the_chosen_product_follows_the_row_class():
    x1, x40, w = torch.randn(1, 64), torch.randn(40, 64, requires_grad=True), torch.randn(96, 64)
    products.use("blas", "onednn")
    assert type(linear(x40, w).grad_fn).__name__ == "_OneDNNLinearBackward"
    products.use("onednn", "blas")
    assert type(linear(x40, w).grad_fn).__name__ != "_OneDNNLinearBackward"
    assert type(linear(x1.requires_grad_(), w).grad_fn).__name__ == "_OneDNNLinearBackward"


@pytest.mark.parametrize("forced", products.PRODUCTS)
def test_forced_product_is_used_for_every_row_class(forced):
    choice = products.choose([(1, 96, 64)], forced, inference=True)
    assert choice["few"] == choice["many"] == forced


def test_measured_choice_names_candidates_and_refuses_packed_training():
    shapes = [(2, 96, 64), (1, 320, 64)]
    inference = products.choose(shapes, "auto", inference=True)
    assert inference["few"] in products.PRODUCTS and inference["many"] in products.PRODUCTS
    training = products.choose(shapes, "auto", inference=False)
    assert training["few"] in ("blas", "onednn") and training["many"] in ("blas", "onednn")
    with pytest.raises(ValueError, match="--cpu-matmul packed"):
        products.choose(shapes, "packed", inference=False)
    with pytest.raises(ValueError, match="--cpu-matmul fast"):
        products.choose(shapes, "fast")
