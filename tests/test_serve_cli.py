"""`python -m eeyore.serve`: the reference command line, and the real default model end to end."""
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import transformers

from eeyore.serve.__main__ import parse_args, sampling_overrides
from eeyore.serve.params import SamplingParams, layered_defaults

REFERENCE_ARGV = ["--model", "DIR", "--host", "127.0.0.1", "--port", "6416", "--temperature", "1.0", "--top-p", "0.8",
                  "--max-new-tokens", "4096", "--sequence-bias", "[[[128009], -4.0]]",
                  "--exponential-decay-length-penalty", "0", "1.01"]


def test_reference_command_line_sets_the_reference_defaults():
    args = parse_args(REFERENCE_ARGV)
    assert (args.model, args.host, args.port) == ("DIR", "127.0.0.1", 6416)
    defaults = layered_defaults({}, sampling_overrides(args))
    assert defaults == SamplingParams(temperature=1.0, top_p=0.8, top_k=50, max_tokens=4096,
                                      sequence_bias=(((128009,), -4.0),), exponential_decay_length_penalty=(0, 1.01))


def test_bad_sequence_bias_flag_is_named():
    with pytest.raises(ValueError, match="--sequence-bias"):
        sampling_overrides(parse_args(["--sequence-bias", "[[128009, -4.0]]"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    for _ in range(1200):  # the model loads after the server listens; /health answers 503 meanwhile
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # a busy machine may answer late
            pass
        assert proc.poll() is None, "the server exited"
        time.sleep(0.2)
    raise AssertionError("the server never became healthy")


def test_default_model_served_with_no_model_flag_matches_transformers(smollm2_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "eeyore.serve", "--port", str(port), "--max-batch-size", "2",
                             "--max-model-len", "512"], stdout=log, stderr=subprocess.STDOUT)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=12)
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, do_sample=False, max_new_tokens=12)[0, ids.shape[1]:]
    assert r.choices[0].message.content == tok.decode(out, skip_special_tokens=True)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens == ids.shape[1]
