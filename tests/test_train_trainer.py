"""The optimizer and schedule of the trainer core against what OpenRLHF builds with transformers."""
from __future__ import annotations

import math

import pytest
import torch

from eeyore.model import Llama, LlamaConfig
from eeyore.train.optim import build_optimizer, warmup_cosine


@pytest.mark.parametrize("total,ratio", [(438, 0.03), (7, 0.03), (50, 0.0)])
def test_schedule_matches_transformers_cosine_with_min_lr(total, ratio):
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    theirs = get_scheduler(
        "cosine_with_min_lr", torch.optim.SGD([param], lr=5e-6), num_warmup_steps=math.ceil(total * ratio),
        num_training_steps=total, scheduler_specific_kwargs={"min_lr": 5e-7},
    )
    ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=5e-6), warmup_cosine(total, ratio))
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-20)
        for scheduler in (ours, theirs):
            scheduler.optimizer.step()  # no gradients: only keeps the scheduler's order check quiet
            scheduler.step()


def test_weight_decay_spares_norms_only():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Llama(config)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sorted(no_decay) == sorted(n for n in names.values() if n.endswith("norm.weight"))
    assert "model.embed_tokens.weight" in decay and "model.layers.0.mlp.down_proj.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # the tied head once
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
