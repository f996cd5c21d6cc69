"""The one checkpoint loader: tied embeddings, clear errors, and the FSDP path equal to the plain one."""
import json

import pytest
import torch

from eeyore.model import Llama, LlamaConfig
from eeyore.model.weights import load_state_dict, save_checkpoint
from eeyore.train.parallel import close_distributed, full_state_dict, init_distributed, load_sharded


def tiny(tie: bool) -> Llama:
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=[2],
                         tie_word_embeddings=tie, torch_dtype="float32")
    torch.manual_seed(0)
    return Llama(config)


def test_tied_head_is_the_embedding_parameter_after_loading(tmp_path):
    tiny(tie=True).save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_state_dict(tmp_path)  # stored once, as HF does
    model = Llama.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one parameter: one gradient, one update
    assert model.generation_config == {"bos_token_id": 1, "eos_token_id": 2} and model.name_or_path == str(tmp_path)


def test_weights_that_do_not_fit_the_config_are_one_error(tmp_path):
    model = tiny(tie=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"weights do not match the config \(missing \['model.layers.2"):
        Llama.from_pretrained(tmp_path)
    # a tied checkpoint that stores the head as well loads, the head read as the embedding
    tied = tiny(tie=True)
    save_checkpoint(tmp_path / "both", {**tied.state_dict(), "lm_head.weight": tied.lm_head.weight.clone()}, tied.config)
    loaded = Llama.from_pretrained(tmp_path / "both")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fsdp_loader_gives_the_plain_loaders_model(tmp_path, tie):
    tiny(tie).save_pretrained(tmp_path)
    plain = Llama.from_pretrained(tmp_path)
    d = init_distributed()
    try:
        sharded = load_sharded(str(tmp_path), d, zero_stage=3)
        state = full_state_dict(sharded)
        ids = torch.randint(0, 300, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(sharded(ids), plain(ids), rtol=0, atol=0)
    finally:
        close_distributed()
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert sharded.generation_config == plain.generation_config and sharded.name_or_path == plain.name_or_path
