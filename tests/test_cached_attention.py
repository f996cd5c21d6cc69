"""`kernels.cached_attention` (Triton's interpreter on CPU) against the readable model's attention
over the cache: SDPA with `enable_gqa` and the boolean mask `keys <= position`."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels import cached_attention  # noqa: E402
from test_kernels import poisoned_outputs  # noqa: E402,F401  (autouse: every kernel output starts as NaN)

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1",
                                reason="the interpreter tests run on CPU tensors")


def masked_sdpa(q, k, v, positions):
    mask = torch.arange(k.shape[2])[None, None, :] <= positions[:, :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("chunk", [1, 5])
def test_matches_masked_sdpa_for_rows_of_different_lengths(group, chunk):
    B, kv_heads, L, D = 3, 2, 150, 24  # L spans three key blocks of 64, D pads to 32
    q = torch.randn(B, kv_heads * group, chunk, D)
    k, v = torch.randn(B, kv_heads, L, D), torch.randn(B, kv_heads, L, D)
    ends = torch.tensor([0, 70, L - 1]) if chunk == 1 else torch.tensor([chunk - 1, 70, L - 1])
    positions = ends[:, None] - chunk + 1 + torch.arange(chunk)  # a chunk ending at each row's last position
    got = cached_attention(q, k, v, positions)
    torch.testing.assert_close(got, masked_sdpa(q, k, v, positions), rtol=1e-5, atol=1e-5)


def test_keys_beyond_a_query_never_count_and_views_of_the_cache_work():
    """The cache's slot view (strided over its full length) with garbage past each row's position,
    and a padded prefill whose padding positions are clamped (not contiguous with the real ones)."""
    slots, kv_heads, max_len, D = 4, 2, 100, 16
    cache_k, cache_v = torch.randn(slots, kv_heads, max_len, D), torch.randn(slots, kv_heads, max_len, D)
    k, v = cache_k[1:3, :, :90], cache_v[1:3, :, :90]  # what KVCache.update hands to attention
    positions = torch.tensor([[10, 11, 12, 89, 89], [40, 41, 42, 43, 44]])
    q = torch.randn(2, 8, 5, D)
    got = cached_attention(q, k, v, positions)
    torch.testing.assert_close(got, masked_sdpa(q, k, v, positions), rtol=1e-5, atol=1e-5)
    ends = torch.tensor([[12], [44]])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 13:], v2[0, :, 13:], k2[1, :, 45:], v2[1, :, 45:] = (float("nan"),) * 4
    got = cached_attention(q[:, :, 2:3], k2, v2, ends)  # NaN past the positions: never read
    torch.testing.assert_close(got, masked_sdpa(q[:, :, 2:3], k, v, ends), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_the_bf16_tolerance(dtype):
    q, k, v = (torch.randn(*shape).to(dtype) for shape in ((2, 8, 3, 32), (2, 2, 77, 32), (2, 2, 77, 32)))
    positions = torch.tensor([[20, 21, 22], [74, 75, 76]])
    got = cached_attention(q, k, v, positions)
    expected = masked_sdpa(q.float(), k.float(), v.float(), positions)
    assert got.dtype == dtype
    assert float((got.float() - expected).norm() / expected.norm()) < 1e-2


def test_shapes_that_do_not_fit_are_one_clear_error():
    q, k = torch.randn(1, 3, 1, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        cached_attention(q, k, k, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        cached_attention(torch.randn(1, 4, 2, 16), k, k, torch.zeros(1, 1, dtype=torch.long))


def test_the_fast_path_routes_cached_attention_to_the_kernel(monkeypatch):
    """With the CUDA routing forced on CPU tensors: a padded two-row chunked prefill, then decode
    steps at different positions, give the plain model's logits and never build the mask."""
    from eeyore.model import KVCache, fastpath, llama
    from test_model import random_model, tiny_config

    config = tiny_config(num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    plain, fast = random_model(config), random_model(config)
    monkeypatch.setattr(fastpath, "_on_gpu", lambda q: True)
    monkeypatch.setattr(fastpath, "_flash_attn", lambda: None)
    fastpath.swap_kernel_modules(fast)
    calls = []
    real = fastpath._kernel
    monkeypatch.setattr(fastpath, "_kernel", lambda name: calls.append(name) or real(name))
    monkeypatch.setattr(llama.Context, "mask", property(lambda self: pytest.fail("the mask was built")))
    ids = torch.randint(0, config.vocab_size, (2, 6))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 4]])  # row 1: padding clamped
    caches = [KVCache(config, 2, 12), KVCache(config, 2, 12)]
    with torch.no_grad():
        got = fast(ids, positions, caches[0])
        monkeypatch.undo()  # the plain model keeps its mask
        expected = plain(ids, positions, caches[1])
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1, :4], expected[1, :4], rtol=1e-4, atol=1e-4)
        assert calls.count("cached_attention") == config.num_hidden_layers
        monkeypatch.setattr(fastpath, "_on_gpu", lambda q: True)
        monkeypatch.setattr(fastpath, "_flash_attn", lambda: None)
        step, at = ids[:, -1:], torch.tensor([[6], [4]])
        for _ in range(3):
            a, b = fast(step, at, caches[0]), plain(step, at, caches[1])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            step, at = a[:, -1:].argmax(-1), at + 1
