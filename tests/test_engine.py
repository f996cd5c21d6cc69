"""The continuous-batching engine on a tiny random checkpoint, against transformers' `generate`."""
import asyncio
import gc
import threading

import pytest
import torch

from eeyore.model import KVCache
from eeyore.serve.engine import Engine
from eeyore.serve.request import EngineFull
from eeyore.serve.params import SamplingParams
from eeyore.serve.text import TextStream
from serve_fixtures import IM_END, byte_tokenizer, hf_greedy

PROMPTS = [[5, 6, 7, 8, 9], [100], list(range(30, 60)), [200, 201, 202], [7] * 12, [65, 66], [1, 2, 3, 4], [250, 9]]


@pytest.mark.parametrize("slots,chunk,product", [(8, 512, "packed"), (2, 4, "blas"), (3, 7, "auto")])
def test_greedy_equals_transformers(tiny_ckpt, tiny_hf, slots, chunk, product, monkeypatch):
    """More requests than slots and prompts prefilled in chunks of 4: requests join and leave
    the batch (rows move between slots) and every one still matches generate token for token,
    whichever CPU product computes the projections. No forward reads its positions back from
    the device (a GPU stall per step): the engine gives each the span it knows, exactly."""
    spans = []

    def span(cache, positions):
        spans.append(cache._span)
        assert cache._span == int(positions.max()) + 1
        return cache._span

    monkeypatch.setattr(KVCache, "span", span)
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=slots, max_model_len=128, prefill_chunk=chunk,
                                fast_path={"cpu_matmul": product}) as engine:
        results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), progress=False)
        if product != "auto":  # its own model: packed for inference when asked
            assert (engine.model.lm_head.weight.layout == torch._mkldnn) == (product == "packed")
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == hf_greedy(tiny_hf, prompt, 16)
        assert result.finish_reason == ("stop" if result.token_ids[-1] == IM_END else "length")
    assert len(spans) > 16 and all(isinstance(s, int) for s in spans)


def test_compiled_decode_equals_transformers(tiny_ckpt, tiny_hf):
    """--compile: the decode step through torch.compile (one dynamic program on CPU) gives the
    same greedy tokens while rows join and leave."""
    prompts = PROMPTS[:3]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=64,
                                fast_path={"compile": True}) as engine:
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # at start, by warm_up
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10), progress=False)
        assert engine.decode_logits.compiled
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled  # no request compiled
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_hf, prompt, 10)


def test_processors_equal_transformers_in_generate(tiny_ckpt, tiny_hf):
    """The whole processor chain (bias with a two-token key, repetition penalty, length decay)
    inside greedy decoding, against generate with the same settings."""
    bias = [[[IM_END], -2.0], [[5, 6], 3.0], [[40], 1.5]]
    params = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3,
                            sequence_bias=tuple((tuple(k), b) for k, b in bias), exponential_decay_length_penalty=(4, 1.3))
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=4, max_model_len=128) as engine:
        results = engine.generate(PROMPTS[:4], params, progress=False)
    for prompt, result in zip(PROMPTS[:4], results):
        expected = hf_greedy(tiny_hf, prompt, 24, repetition_penalty=1.3, sequence_bias=bias,
                             exponential_decay_length_penalty=(4, 1.3))
        assert result.token_ids == expected


def test_shared_prefixes_are_copied_not_recomputed(tiny_ckpt, tiny_hf):
    system = list(range(70, 100))  # a 30-token "system prompt" shared by every request
    prompts = [system + [5, 6], system + [7], system, system[:20] + [1, 2, 3]]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=5, max_model_len=256) as engine:
        started = threading.Event()
        anchor = engine.submit(system + [9], SamplingParams(max_tokens=200, ignore_eos=True), lambda out: started.set())
        assert started.wait(30)  # running: the others find their prefix in its slot
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12), progress=False)
        engine.abort(anchor)
        # the third prompt's last token is left to the decode step, so 29 of its 30 are copied
        assert engine.reused_prefix_tokens == 30 + 30 + 29 + 20
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_hf, prompt, 12)


def test_next_turn_reuses_the_finished_turns_entries(tiny_ckpt, tiny_hf):
    """A conversation's next turn resends the history: only what is new is prefilled."""
    a, b = list(range(40, 60)), list(range(100, 130))
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=256) as engine:
        # a (slot 0) leaves first: b moves to slot 0 and a's entries are swapped into slot 1
        ra, rb = engine.generate([a, b], [greedy.updated(max_tokens=4), greedy.updated(max_tokens=12)], progress=False)
        follow_up = a + ra.token_ids + [9, 9]
        before = engine.reused_prefix_tokens
        # it lands in slot 0 (b's retired slot) and copies a's entries back from slot 1
        result = engine.generate([follow_up], SamplingParams(temperature=0.0, max_tokens=8), progress=False)[0]
        assert engine.reused_prefix_tokens - before == len(a) + len(ra.token_ids) - 1
    assert rb.token_ids == hf_greedy(tiny_hf, b, 12, min_new_tokens=12)
    assert result.token_ids == hf_greedy(tiny_hf, follow_up, 8)


def test_seeded_request_alone_and_in_a_batch_of_8(tiny_ckpt):
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    others = [SamplingParams(temperature=t, top_k=k, seed=None if i % 2 else i, max_tokens=8 + 3 * i)
              for i, (t, k) in enumerate([(0.0, 50), (1.5, 0), (0.7, 5), (1.0, 0), (1.0, 50), (0.3, 2), (2.0, 0)])]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=8, max_model_len=128) as engine:
        alone = engine.generate([PROMPTS[2]], target, progress=False)[0].token_ids
        batch = engine.generate(PROMPTS[:2] + [PROMPTS[2]] + PROMPTS[3:], others[:2] + [target] + others[2:], progress=False)
        other_seed = engine.generate([PROMPTS[2]], target.updated(seed=99), progress=False)[0].token_ids
    assert batch[2].token_ids == alone
    assert other_seed != alone


def test_stop_strings_across_tokens_and_utf8(tiny_ckpt):
    """Every byte is a token here, so each stop string spans tokens; the text before it is kept whole."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=4, max_model_len=128) as engine:
        full = engine.generate([PROMPTS[0]], params, progress=False)[0]
        stop = full.text[6:9]
        cut = engine.generate([PROMPTS[0]], params.updated(stop=("never there", stop)), progress=False)[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop" and len(cut.token_ids) < len(full.token_ids)
    assert full.text == byte_tokenizer().decode(full.token_ids, skip_special_tokens=True)


def test_text_stream_holds_back_partial_stops_and_characters():
    tok = byte_tokenizer()
    stream = TextStream(tok.stream_decoder(), stop=["END"])
    pieces = [stream.push(t) for t in tok.encode("é E EN ENd")]
    assert [p for p, _ in pieces] == ["", "é", " ", "", "E ", "", "", "EN ", "", "", "ENd"]  # é is 2 bytes
    assert not any(hit for _, hit in pieces) and stream.flush() == ""
    stream = TextStream(tok.stream_decoder(), stop=["END"])
    assert "".join(stream.push(t)[0] for t in tok.encode("x EN")) == "x "
    assert stream.push(tok.encode("D")[0]) == ("", True)
    stream = TextStream(tok.stream_decoder(), stop=["lo"])
    assert [stream.push(t) for t in tok.encode("hel")] == [("h", False), ("e", False), ("", False)]
    assert stream.flush() == "l"


def test_cancel_frees_the_slot_and_nothing_leaks(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=1, max_queue=1, max_model_len=256) as engine:
        first = threading.Event()
        long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), lambda out: first.set())
        assert first.wait(30)
        waiting = engine.submit(PROMPTS[1], SamplingParams(max_tokens=5), lambda out: None)
        with pytest.raises(EngineFull):  # one running, one waiting: the queue bound is reached
            engine.submit(PROMPTS[1], SamplingParams(max_tokens=5), lambda out: None)
        engine.abort(long)
        engine.abort(waiting)
        result = engine.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=5), progress=False)
        assert len(result[0].token_ids) == 5
        assert engine.running == 0 and engine.queued == 0
        del long, waiting, result
        gc.collect()
        assert len(engine.live) == 0


def test_context_limits_are_checked(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=1, max_model_len=32) as engine:
        with pytest.raises(ValueError, match="context length is 32"):
            engine.check_prompt([1] * 32, SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.check_prompt([1, 999], SamplingParams())
        assert engine.check_prompt([1] * 20, SamplingParams()) == 12
        # a budget beyond the context is cut to the room left (the reference's --max-new-tokens
        # 4096 with the evaluator's --max-tokens 4096 on a 4096-token model)
        assert engine.check_prompt([1] * 20, SamplingParams(max_tokens=13)) == 12
        assert engine.check_prompt([1] * 20, SamplingParams(max_tokens=5)) == 5
        # without max_tokens, or with too large a one, a request runs to the end of the context
        for params in (SamplingParams(ignore_eos=True), SamplingParams(ignore_eos=True, max_tokens=4096)):
            out = engine.generate([[1] * 20], params, progress=False)[0]
            assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_final_assistant_message_is_continued(tiny_ckpt):
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=1, max_model_len=128) as engine:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I feel"}]
        ids = engine.encode_chat(messages, continue_final=True)
        assert byte_tokenizer().decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nI feel"
        fresh = engine.encode_chat(messages[:1])
        assert byte_tokenizer().decode(fresh).endswith("<|im_start|>assistant\n")


def test_async_and_sync_offline_generation_agree(tiny_ckpt):
    prompts = [[{"role": "user", "content": "hello"}], "plain text prompt", PROMPTS[0]]
    params = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(seed=3, max_tokens=10),
              SamplingParams(temperature=0.0, max_tokens=4)]
    with Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_queue=1, max_model_len=128) as engine:
        sync = engine.generate(prompts, params, progress=False)  # more prompts than the queue bound: offline waits
        both = asyncio.run(engine.agenerate(prompts, params))
    assert [c.token_ids for c in both] == [c.token_ids for c in sync]
    assert [len(c.token_ids) for c in sync][2] == 4 and sync[0].prompt_tokens == len(engine.encode_chat(prompts[0]))


def test_a_failed_set_up_is_raised_by_start(tiny_ckpt, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate the KV cache")

    monkeypatch.setattr("eeyore.serve.engine.KVCache", no_memory)
    engine = Engine.from_pretrained(tiny_ckpt, max_batch_size=2, max_model_len=64)
    with pytest.raises(MemoryError, match="KV cache"):
        engine.start()
    monkeypatch.undo()
    with engine:  # nothing was left half-started: a second start works
        result = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3), progress=False)[0]
    assert len(result.token_ids) == 3
