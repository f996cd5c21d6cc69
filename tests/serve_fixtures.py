"""A tiny random Llama checkpoint with a byte-level tokenizer, for the engine and server tests.

Every byte is one token, so stop strings always span several tokens and a random model emits
multi-byte characters split across tokens: the cases that streaming must get right.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import openai
import torch
from aiohttp import web
from tokenizers import Regex, pre_tokenizers

from eeyore.model import Llama, LlamaConfig
from eeyore.model.tokenizer import Tokenizer
from eeyore.model.tokenizer_formats import LLAMA3_SPLIT, byte_alphabet, byte_level_bpe
from eeyore.serve.app import LOADING, create_app

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
IM_START, IM_END, ENDOFTEXT = 256, 257, 258
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    vocab = {c: i for i, c in enumerate(byte_alphabet())}
    backend = byte_level_bpe(vocab, [], pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), special=SPECIALS)
    return Tokenizer(backend, eos_tokens=["<|im_end|>"], chat_template=CHATML)


def tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama (vocab = the 259 tokens of `byte_tokenizer`) with its tokenizer."""
    config = LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, bos_token_id=None,
        eos_token_id=[IM_END], tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():  # larger logits than the default init, so greedy choices are clear-cut
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(out_dir, tokenizer=byte_tokenizer())
    return Path(out_dir)


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    """transformers' greedy continuation of `prompt` (new token ids only)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, **kw)
    return out[0, len(prompt):].tolist()


class LiveServer:
    """The aiohttp app on a free port, served from a background thread's event loop."""

    def __init__(self, load_engine, name: str = "tiny", api_key: str | None = None, wait: bool = True, **app_kwargs) -> None:
        self.name, self.api_key = name, api_key
        self.app = create_app(load_engine, name, api_key, **app_kwargs)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait()
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            self.wait_loaded()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, handler_cancellation=True)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def wait_loaded(self):
        async def loaded():
            return await self.app[LOADING]

        self.engine = asyncio.run_coroutine_threadsafe(loaded(), self.loop).result()
        return self.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
