"""The compiled decode step against the eager one, and how it writes the KV cache."""
import torch
from torch._inductor.utils import run_and_get_code

from eeyore.model.decode import DecodeStep
from eeyore.model.kv_cache import KVCache
from test_model import random_model, tiny_config


def test_compiled_step_writes_the_cache_in_place():
    """The compiled step stores each new key and value into the cache itself. A write through a
    view of the cache used to compile into a buffer the size of the whole cache, filled and
    copied back at every step: seconds per step for a server's 16 slots of 8192 positions."""
    model = random_model(tiny_config())
    caches = [KVCache(model.config, 5, 97) for _ in range(2)]
    prompt = torch.randint(0, model.config.vocab_size, (3, 12))
    ids, positions = torch.tensor([[3], [4], [5]]), torch.tensor([[11], [9], [11]])
    with torch.inference_mode():
        for cache in caches:
            model(prompt, torch.arange(12).expand(3, -1), cache.rows(0, 3))
        eager = DecodeStep(model)(ids, positions, caches[0], 12)
        compiled, code = run_and_get_code(DecodeStep(model, compile=True), ids, positions, caches[1], 12)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # Row 1's key went to position 9, the others' to 11; slot 3 took the padding row of the
    # batch bucket of 4, which writes at the last position, one no real row reads.
    for a, b in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        torch.testing.assert_close(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)
        assert a[:, 3, :, :-1].eq(0).all() and a[:, 4].eq(0).all()
    shape = str(tuple(caches[1].k.shape))
    copies = [line.strip() for line in "\n".join(code).splitlines() if "empty_strided" in line and shape in line]
    assert not copies, copies


def _prefilled(model, count: int):
    """`count` caches holding the same 9-token prefill of two rows (up to positions 9 and 6),
    and the ids and positions of one decode step for those rows."""
    caches = [KVCache(model.config, 2, 40, dtype=next(model.parameters()).dtype) for _ in range(count)]
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        for cache in caches:
            model(prompt, torch.arange(9).expand(2, -1), cache.rows(0, 2))
    return caches, torch.tensor([[3], [4]]), torch.tensor([[9], [6]])


def test_compiled_step_runs_the_plain_code_of_the_kernel_modules():
    """With the Triton kernel modules swapped in (as on a GPU), the compiled step is still one
    whole graph: under the compiler each module runs its plain code, which the compiler fuses
    itself. A call into a Triton kernel there split the graph at every layer, and the pieces,
    compiled again per layer, ran over the compiler's recompile limit and fell back to eager."""
    from eeyore.model.fastpath import KernelAttention, swap_kernel_modules

    model = random_model(tiny_config())
    caches, ids, positions = _prefilled(model, 2)
    with torch.inference_mode():
        eager = DecodeStep(model)(ids, positions, caches[0], 10)
        swap_kernel_modules(model)
        assert isinstance(model.model.layers[0].self_attn, KernelAttention)
        compiled = DecodeStep(model, compile=True)(ids, positions, caches[1], 10)  # fullgraph: a split raises
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_bf16_step_on_cpu_is_frozen():
    """A bf16 step compiled on CPU takes the weights as constants of its own (so the compiler may
    lay them out for its kernels and time its products): it gives the eager step's logits within
    bf16 rounding, and it keeps giving them after the model's weights are overwritten, which a
    program reading the model's weights (the fp32 one) would not."""
    model = random_model(tiny_config()).to(torch.bfloat16)
    caches, ids, positions = _prefilled(model, 3)
    with torch.inference_mode():
        eager = DecodeStep(model)(ids, positions, caches[0], 10)
        step = DecodeStep(model, compile=True)
        assert step.frozen
        compiled = step(ids, positions, caches[1], 10)
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=3e-2)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
        assert not torch.allclose(DecodeStep(model)(ids, positions, caches[2], 10).float(), eager.float(), atol=3e-2)
        torch.testing.assert_close(step(ids, positions, caches[1], 10), compiled, rtol=0, atol=0)
