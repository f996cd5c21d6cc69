"""DPO math against hand-computed values, and summed log-probs against transformers."""
import math

import pytest
import torch

from eeyore.model import Llama, LlamaConfig
from eeyore.train.dpo_loss import DPOLossConfig, preference_loss, response_logps
from eeyore.train.loss import IGNORE_INDEX
from eeyore.train.tokens import Example, collate

# Two pairs. Pair 0: policy prefers chosen by 2 nats more than the reference (z = 2);
# pair 1: policy prefers rejected by 1 nat (z = -1).
POLICY_C, POLICY_R = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
REF_C, REF_R = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def test_sigmoid_loss_rewards_accuracy_margin():
    out = preference_loss(POLICY_C, POLICY_R, REF_C, REF_R, DPOLossConfig(beta=0.1))
    # -log σ(βz) = log(1 + e^{-βz}): z = 2 -> 0.598138869, z = -1 -> 0.744396660
    assert out.losses.tolist() == pytest.approx([0.598138869, 0.744396660], abs=1e-7)
    assert out.loss.item() == pytest.approx((0.598138869 + 0.744396660) / 2, abs=1e-7)
    # rewards β(π - ref): chosen (0.1, 0), rejected (-0.1, 0.1)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0], abs=1e-7)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1], abs=1e-7)
    assert out.accuracy.item() == 0.5
    assert out.margin.item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-7)


def test_label_smoothing_and_ipo():
    smoothed = preference_loss(POLICY_C, POLICY_R, REF_C, REF_R, DPOLossConfig(beta=0.1, label_smoothing=0.1))
    expect = [0.9 * softplus(-0.2) + 0.1 * softplus(0.2), 0.9 * softplus(0.1) + 0.1 * softplus(-0.1)]
    assert smoothed.losses.tolist() == pytest.approx(expect, abs=1e-7)
    assert smoothed.losses.tolist() == pytest.approx([0.618138869, 0.734396660], abs=1e-7)

    ipo = preference_loss(POLICY_C, POLICY_R, REF_C, REF_R, DPOLossConfig(beta=0.1, ipo=True))
    # (z - 1/(2β))² with 1/(2β) = 5: (2 - 5)² = 9, (-1 - 5)² = 36
    assert ipo.losses.tolist() == pytest.approx([9.0, 36.0])
    assert ipo.loss.item() == pytest.approx(22.5)


def test_nll_term_and_gradients_reach_only_the_policy():
    policy_c = POLICY_C.clone().requires_grad_()
    policy_r = POLICY_R.clone().requires_grad_()
    ref_c, ref_r = REF_C.clone().requires_grad_(), REF_R.clone().requires_grad_()
    mean_c = torch.tensor([-2.0, -1.0], requires_grad=True)
    out = preference_loss(policy_c, policy_r, ref_c.detach(), ref_r.detach(), DPOLossConfig(beta=0.1, nll_loss_coef=0.5), mean_c)
    assert out.loss.item() == pytest.approx((0.598138869 + 0.744396660) / 2 + 0.5 * 1.5, abs=1e-6)
    out.loss.backward()
    # d/dπ_c of -logσ(βz)/B = -β σ(-βz) / B
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert policy_c.grad.tolist() == pytest.approx([-0.1 * sig(-0.2) / 2, -0.1 * sig(0.1) / 2], abs=1e-7)
    assert mean_c.grad.tolist() == pytest.approx([-0.25, -0.25])
    assert ref_c.grad is None and ref_r.grad is None
    assert not out.chosen_rewards.requires_grad


def test_first_step_loss_is_log2():
    same = torch.tensor([-3.0, -7.0, -1.5])
    out = preference_loss(same, same - 2, same, same - 2, DPOLossConfig(beta=0.5))
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.accuracy.item() == 0.0  # ties are not wins


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="beta"):
        DPOLossConfig(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLossConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match="nll_loss_coef"):
        preference_loss(POLICY_C, POLICY_R, REF_C, REF_R, DPOLossConfig(nll_loss_coef=1.0))


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=[2], torch_dtype="float32",
    )


def test_summed_logps_match_transformers(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_config()
    ours = Llama(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
    theirs.load_state_dict(ours.state_dict())

    input_ids = torch.randint(3, 97, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5:12] = True  # full-length row
    mask[1, 3:8] = True  # padded after 8
    mask[2, 10:11] = True  # one response token
    # a small slice size exercises the sliced projection and its gradient path
    monkeypatch.setattr("eeyore.train.loss._rows_per_block", lambda vocab: 4)
    hidden = ours.hidden_states(input_ids)
    labels = [[t if m else IGNORE_INDEX for t, m in zip(ids, row)] for ids, row in zip(input_ids.tolist(), mask.tolist())]
    targets = collate([Example(ids, lab) for ids, lab in zip(input_ids.tolist(), labels)], pad_id=0).targets
    sums, means = response_logps(hidden, ours.lm_head.weight, targets)

    with torch.no_grad():
        logp = theirs(input_ids).logits.float().log_softmax(-1)
    token = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    expect = (token * mask[:, 1:]).sum(1)
    torch.testing.assert_close(sums, expect, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(means, expect / mask[:, 1:].sum(1), atol=1e-5, rtol=1e-5)

    # the sliced, recomputed projection gives the same gradient as a plain one
    sums.sum().backward()
    chunked = ours.lm_head.weight.grad.clone()
    ours.zero_grad()
    logits = ours(input_ids).float().log_softmax(-1)
    plain = (logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum()
    plain.backward()
    torch.testing.assert_close(chunked, ours.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
