"""`speed_up` swaps faster variants into the readable model without changing what it computes."""
import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from eeyore.model import KVCache, Llama, linear as products, llama
from eeyore.model.fastpath import CacheAttention, ChosenLinear, KernelAttention, KernelMLP, KernelRMSNorm, speed_up
from test_model import CONFIGS, random_model, tiny_config


@pytest.fixture(autouse=True)
def plain_products():
    yield
    products.use("blas", "blas")


def _checkpoint(tmp_path, name):
    random_model(tiny_config(**CONFIGS[name])).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name", ["gqa-untied-llama3", "mha-tied"])
@pytest.mark.parametrize("product", ["auto", *products.PRODUCTS])
def test_every_cpu_product_gives_the_plain_logits(tmp_path, name, product):
    ckpt = _checkpoint(tmp_path, name)
    plain, fast = Llama.from_pretrained(ckpt), Llama.from_pretrained(ckpt)
    summary = speed_up(fast, kernels="off", cpu_matmul=product, inference=True)
    assert product == "auto" or summary["cpu_matmul"]["few"] == product
    assert all(type(m) is ChosenLinear for m in fast.modules() if isinstance(m, torch.nn.Linear))
    packed = summary["cpu_matmul"]["few"] == "packed"
    assert (fast.model.layers[0].mlp.up_proj.weight.layout == torch._mkldnn) == packed
    # the tied table stays a plain parameter, for the embedding lookup and the lm_head alike
    assert fast.model.embed_tokens.weight.layout == torch.strided
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        for rows in (ids[:, :1], ids):  # the few-row and the many-row class
            torch.testing.assert_close(fast(rows), plain(rows), rtol=1e-4, atol=1e-4)
    if packed:
        with pytest.raises(ValueError, match="inference-only"):
            fast.save_pretrained(tmp_path / "out")


@pytest.mark.skipif(torch.bfloat16 not in products.DTYPES, reason="this CPU's oneDNN has no bf16")
@pytest.mark.parametrize("product", ["auto", "packed"])
def test_bf16_inference_packs_and_gives_the_plain_logits(tmp_path, product):
    ckpt = _checkpoint(tmp_path, "gqa-untied-llama3")
    plain, fast = Llama.from_pretrained(ckpt, dtype=torch.bfloat16), Llama.from_pretrained(ckpt, dtype=torch.bfloat16)
    summary = speed_up(fast, kernels="off", cpu_matmul=product, inference=True)
    packed = summary["cpu_matmul"]["few"] == "packed"
    assert product == "auto" or packed
    assert (fast.model.layers[0].self_attn.q_proj.weight.layout == torch._mkldnn) == packed
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        for rows in (ids[:, :1], ids):
            torch.testing.assert_close(fast(rows), plain(rows), rtol=2e-2, atol=2e-2)
    # bf16 training keeps F.linear: nothing is measured, nothing swapped
    trained = Llama.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert "cpu_matmul" not in speed_up(trained, kernels="off", cpu_matmul="onednn")
    assert not any(type(m) is ChosenLinear for m in trained.modules())


@pytest.mark.parametrize("product", ["blas", "onednn"])
def test_training_products_give_the_plain_gradients(product):
    config = tiny_config(**CONFIGS["mha-tied"])
    plain, fast = random_model(config), random_model(config)
    speed_up(fast, kernels="off", cpu_matmul=product)
    ids = torch.randint(0, 320, (2, 24))
    for m in (plain, fast):
        F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="inference only"):
        speed_up(random_model(config), cpu_matmul="packed")


def test_cache_attention_reads_each_key_once_and_gives_the_plain_logits(monkeypatch):
    """Rows at different positions over stale slots, chunked prefill and decode: the folded query
    heads give the plain model's logits, and no attention call repeats a key/value head."""
    config = tiny_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    plain, fast = random_model(config), random_model(config)
    speed_up(fast, kernels="off", cpu_matmul="blas")
    assert all(type(b.self_attn) is CacheAttention for b in fast.model.layers)
    heads = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: heads.append(
        (q.shape[1], k.shape[1], kw.get("attn_mask") is None)) or sdpa(q, k, v, **kw))
    ids, stale = torch.randint(0, config.vocab_size, (2, 60)), torch.randint(0, config.vocab_size, (1, 75))
    caches = [KVCache(config, slots=3, max_len=80) for _ in range(2)]
    with torch.no_grad():
        outs = []
        for model, cache in zip((plain, fast), caches):
            model(stale, torch.arange(75)[None], cache.rows(2, 3))  # row 1 reads these below position 5
            chunks = [model(ids[:, a:a + 7], torch.arange(a, a + 7).expand(2, -1) + torch.tensor([[0], [5]]),
                            cache.rows(1, 3)) for a in (0, 7, 14)]
            steps = [model(ids[:, 21 + i:22 + i], torch.tensor([[21 + i], [26 + i]]), cache.rows(1, 3)) for i in range(8)]
            outs.append(torch.cat(chunks + steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    fast_calls = heads[len(heads) // 2:]  # the plain model's calls came first
    # the stale row fills its slot from the start: plain causal attention, each kernel's own GQA
    from_start, masked = fast_calls[:config.num_hidden_layers], fast_calls[config.num_hidden_layers:]
    assert all(call == (6, 2, True) for call in from_start)
    assert masked and all(call == (2, 2, False) for call in masked)


def _plain_kernels(calls):
    """A stand-in for the Triton `kernels` package that counts calls and computes in plain torch."""
    def counted(name, fn):
        def wrapper(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return wrapper
    rms = lambda x, w, eps: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return types.SimpleNamespace(rms_norm=counted("rms_norm", rms), apply_rope=counted("apply_rope", llama.apply_rope),
                                 swiglu=counted("swiglu", lambda g, u: F.silu(g) * u))


def test_kernels_on_and_off_give_the_same_logits(monkeypatch):
    config = tiny_config(**CONFIGS["gqa-untied-llama3"])
    plain, fast = random_model(config), random_model(config)
    assert speed_up(plain, kernels="auto", cpu_matmul="blas")["kernels"] is False  # auto: off on CPU
    calls = {}
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setitem(sys.modules, "kernels", _plain_kernels(calls))
    assert speed_up(fast, kernels="on", cpu_matmul="blas")["kernels"] is True
    assert type(fast.model.norm) is KernelRMSNorm and type(fast.model.layers[1].mlp) is KernelMLP
    assert type(fast.model.layers[0].self_attn) is KernelAttention
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), plain(ids), rtol=1e-5, atol=1e-5)
    layers = config.num_hidden_layers
    assert calls == {"rms_norm": 2 * layers + 1, "apply_rope": layers, "swiglu": layers}


def test_kernels_on_without_triton_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with pytest.raises(ValueError, match="--kernels on: .*triton"):
        speed_up(random_model(tiny_config()), kernels="on")


def test_the_readable_module_has_no_platform_paths():
    source = inspect.getsource(llama).lower()
    for word in ("cuda", "mkldnn", "onednn", "flash", "triton", "device.type", "linear("):
        assert word not in source.replace("nn.linear(", ""), word


def test_server_and_trainers_take_the_switches():
    from eeyore.serve.__main__ import parse_args as serve_args
    from eeyore.train.sft import parse_args as sft_args

    served = serve_args(["--kernels", "off", "--cpu-matmul", "onednn", "--compile"])
    assert (served.kernels, served.cpu_matmul, served.compile) == ("off", "onednn", True)
    assert (serve_args([]).kernels, serve_args([]).cpu_matmul, serve_args([]).compile) == ("auto", "auto", False)
    trained = sft_args(["--dataset", "x", "--cpu_matmul", "onednn", "--kernels", "off"])
    assert (trained.kernels, trained.cpu_matmul) == ("off", "onednn")
    assert sft_args(["--dataset", "x"]).kernels == "auto"


def test_compiled_decode_equals_eager_on_the_embedded_model(smollm2_dir):
    """The embedded model's real weights and shapes, cut to two layers to keep the compile short:
    rows at different positions decode the same greedy tokens eagerly and compiled."""
    from eeyore.model import KVCache
    from eeyore.model.decode import DecodeStep
    from eeyore.model.tokenizer import Tokenizer

    model = Llama.from_pretrained(smollm2_dir)
    del model.model.layers[2:]
    model.config.num_hidden_layers = 2
    tok = Tokenizer.from_pretrained(smollm2_dir)
    prompts = [tok.encode("The counsellor asked me how I slept"), tok.encode("Hello, my name is")]

    def greedy(step: DecodeStep) -> list[list[int]]:
        cache, out = KVCache(model.config, 2, 64), [[], []]
        with torch.inference_mode():
            for row, ids in enumerate(prompts):  # prefill all but the last prompt token
                model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache.rows(row, row + 1))
            tokens = torch.tensor([[p[-1]] for p in prompts])
            positions = torch.tensor([[len(p) - 1] for p in prompts])
            for _ in range(8):
                tokens = step(tokens, positions, cache).argmax(-1, keepdim=True)
                positions = positions + 1
                for row in range(2):
                    out[row].append(int(tokens[row]))
        return out

    assert greedy(DecodeStep(model, compile=True)) == greedy(DecodeStep(model))
