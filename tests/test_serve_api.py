"""The server through the official `openai` client, on a tiny random checkpoint, with
transformers' `generate` as the reference for greedy output and log-probabilities."""
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from eeyore.serve.engine import Engine
from serve_fixtures import IM_END, LiveServer, byte_tokenizer, hf_greedy

KEY = "secret"
CHAT = [{"role": "system", "content": "You are sad."}, {"role": "user", "content": "How are you today?"}]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = LiveServer(lambda: Engine.from_pretrained(tiny_ckpt, max_batch_size=8, max_model_len=512), api_key=KEY)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def text_of(ids):
    return byte_tokenizer().decode(ids, skip_special_tokens=True)


def test_chat_greedy_equals_transformers(server, client, tiny_hf):
    prompt = server.engine.encode_chat(CHAT)
    expected = hf_greedy(tiny_hf, prompt, 20)
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(expected)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == IM_END else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(expected))
    assert r.usage.total_tokens == len(prompt) + len(expected)


def test_final_assistant_message_is_continued(server, client, tiny_hf):
    messages = CHAT + [{"role": "assistant", "content": "Honestly, I"}]
    prompt = byte_tokenizer().encode("<|im_start|>system\nYou are sad.<|im_end|>\n<|im_start|>user\n"
                                     "How are you today?<|im_end|>\n<|im_start|>assistant\nHonestly, I")
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    assert r.choices[0].message.content == text_of(hf_greedy(tiny_hf, prompt, 10))
    assert r.usage.prompt_tokens == len(prompt)


def test_completion_from_token_ids_equals_transformers(client, tiny_hf):
    prompt = [10, 20, 30, 40, 50, 60]
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=24)
    assert r.choices[0].text == text_of(hf_greedy(tiny_hf, prompt, 24))
    assert r.usage.prompt_tokens == len(prompt)


def test_streaming_gives_the_same_text(client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_and_seeds(client):
    kw = dict(model="tiny", messages=CHAT, temperature=1.0, max_tokens=20, extra_body={"ignore_eos": True})
    two = client.chat.completions.create(n=2, seed=5, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 40
    first = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    second = client.chat.completions.create(seed=6, **kw).choices[0].message.content
    assert [c.message.content for c in two.choices] == [first, second]
    assert first != second
    assert client.chat.completions.create(seed=5, **kw).choices[0].message.content == first


def test_stop_strings(client):
    kw = dict(model="tiny", messages=CHAT, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[10:12]
    r = client.chat.completions.create(stop=["\x00never", stop], **kw)
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.find(stop)]


def test_eos_bias_stops_and_sequence_bias_extension(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=20,
                                       extra_body={"sequence_bias": [[[IM_END], 100.0]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].message.content == ""


def test_logprobs_are_the_models(server, client, tiny_hf):
    prompt = server.engine.encode_chat(CHAT)
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = hf_greedy(tiny_hf, prompt, 8)
    with torch.no_grad():
        lp = tiny_hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    assert len(content) == len(ids)
    for i, (entry, token) in enumerate(zip(content, ids)):
        assert entry.logprob == pytest.approx(float(lp[i, token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-4)
        assert entry.token == byte_tokenizer().decode([token])


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_same_tokens_alone_and_in_a_batch_of_8(client):
    kw = dict(model="tiny", temperature=0.8, top_p=0.95, max_tokens=24, extra_body={"ignore_eos": True})
    target = dict(messages=CHAT, seed=42, **kw)
    alone = client.chat.completions.create(**target).choices[0].message.content
    others = [dict(messages=[{"role": "user", "content": f"other {i}" * (i + 1)}], seed=i, **kw) for i in range(7)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda body: client.chat.completions.create(**body), others[:3] + [target] + others[3:]))
    assert results[3].choices[0].message.content == alone


def test_32_concurrent_clients(server, tiny_hf):
    messages = [[{"role": "user", "content": f"client {i}: " + "x" * (i % 5)}] for i in range(32)]
    expected = [text_of(hf_greedy(tiny_hf, server.engine.encode_chat(m), 12)) for m in messages]

    def ask(m):  # a client each, as 32 separate programs would
        return server.client().chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=12)

    with ThreadPoolExecutor(32) as pool:
        answers = [r.choices[0].message.content for r in pool.map(ask, messages)]
    assert answers == expected


def wait_idle(engine):
    for _ in range(600):  # polls the engine's state; there is no time bound on the work itself
        if engine.running == 0 and engine.queued == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.running} running, {engine.queued} queued")


def test_disconnect_mid_stream_frees_the_slot(server, client):
    wait_idle(server.engine)
    for _ in range(3):
        stream = client.completions.create(model="tiny", prompt=[1, 2], max_tokens=500, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        (req,) = server.engine.live
        stream.close()
        wait_idle(server.engine)
        assert req.cancelled and req.generated < 500  # stopped by the disconnect, not by max_tokens
        del req
    gc.collect()
    assert len(server.engine.live) == 0  # no request object outlives its client
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
