"""The sliced cross-entropy against the full-logits loss of torch, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eeyore.train.loss import IGNORE_INDEX, cross_entropy_sum, token_logprobs


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 32, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(97, 32, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 11), generator=g)
    targets[0, :4] = IGNORE_INDEX  # a prompt
    targets[2, 7:] = IGNORE_INDEX  # padding
    return hidden, weight, targets


def _naive(hidden, weight, targets, reduction):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_sum_and_gradients_match_full_logits(rows):
    hidden, weight, targets = _inputs()
    total, count = cross_entropy_sum(hidden, weight, targets, rows_per_block=rows)
    expected = _naive(hidden, weight, targets, "sum")
    assert int(count) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    # a non-unit upstream gradient, as the 1 / tokens / accumulation scaling gives
    grads = torch.autograd.grad(total * 0.37, (hidden, weight))
    ref = torch.autograd.grad(expected * 0.37, (hidden, weight))
    for ours, theirs in zip(grads, ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert grads[0][0, :4].abs().max() == 0  # ignored rows get no gradient


def test_bf16_parameters_keep_fp32_statistics():
    hidden, weight, targets = _inputs(torch.bfloat16)
    total, _ = cross_entropy_sum(hidden, weight, targets, rows_per_block=4)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, _naive(hidden, weight, targets, "sum"), rtol=1e-5, atol=1e-4)
    gh, gw = torch.autograd.grad(total, (hidden, weight))
    rh, rw = torch.autograd.grad(_naive(hidden, weight, targets, "sum"), (hidden, weight))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)


def test_tied_weight_gradient_adds_up():
    # With tied embeddings the head weight also feeds the input: both gradients must accumulate.
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    ids = torch.randint(0, 50, (2, 9), generator=g)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    hidden = torch.tanh(F.embedding(ids, emb))
    total, _ = cross_entropy_sum(hidden, emb, targets, rows_per_block=3)
    (ours,) = torch.autograd.grad(total, emb)
    (theirs,) = torch.autograd.grad(_naive(torch.tanh(F.embedding(ids, emb)), emb, targets, "sum"), emb)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_no_targets_gives_zero_and_zero_gradient():
    hidden, weight, targets = _inputs()
    total, count = cross_entropy_sum(hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert float(total.detach()) == 0 and int(count) == 0
    gh, gw = torch.autograd.grad(total, (hidden, weight))
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_no_grad_evaluation():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        total, _ = cross_entropy_sum(hidden, weight, targets, rows_per_block=2)
    assert not total.requires_grad
    torch.testing.assert_close(total, _naive(hidden, weight, targets, "sum").detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 64])
def test_token_logprobs_with_per_token_weights(rows):
    hidden, weight, targets = _inputs(seed=3)
    ours = token_logprobs(hidden, weight, targets, rows_per_block=rows)
    expected = -_naive(hidden, weight, targets, "none").view(targets.shape)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert ours[targets == IGNORE_INDEX].abs().max() == 0
    # A non-linear function of per-sequence sums, like DPO's: gradients flow through every token.
    upstream = lambda lp: F.logsigmoid(lp.sum(1) * torch.tensor([0.1, -0.2, 0.3])).sum()  # noqa: E731
    grads = torch.autograd.grad(upstream(ours), (hidden, weight))
    ref = torch.autograd.grad(upstream(expected), (hidden, weight))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_backward_is_refused():
    hidden, weight, targets = _inputs()
    total, _ = cross_entropy_sum(hidden, weight, targets)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        total.backward()
