"""Shared fixtures: the real demo model and the real test conversations."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from shared_data import shared_records

# The Triton kernels' tests run them in Triton's interpreter on CPU tensors. Triton reads this when
# it is first imported, and any test module (the engine's, say) may import it first.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the embedded GGUF (once per machine)."""
    from eeyore.model.convert import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def conversations() -> list[list[dict]]:
    """The 12 real conversations of the reference test set (system prompt first)."""
    return [record["conversation"] for record in shared_records()]


@pytest.fixture(scope="session")
def llama3_path() -> Path:
    """Meta's tiktoken-format Llama 3 tokenizer, as the `llama-models` package ships it."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama-models is not installed (pip install --no-deps llama-models)")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama3(llama3_path):
    """The real Llama 3 tokenizer (no chat template of its own)."""
    from eeyore.model.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(llama3_path)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with a one-byte-per-token tokenizer (serve_fixtures.py)."""
    from serve_fixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_ckpt):
    """The same checkpoint in transformers: the reference for greedy output and log-probs."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
