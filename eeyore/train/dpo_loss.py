"""The DPO objective: summed response log-probabilities and the preference losses.

With z = (π_c − π_r) − (ref_c − ref_r), the log-ratio margin of the policy over the reference:
  sigmoid DPO (label smoothing ε, "conservative DPO"):  −(1−ε)·logσ(βz) − ε·logσ(−βz)
  IPO:                                                   (z − 1/(2β))²
  optional NLL on chosen:                                −mean over pairs of the per-sequence
                                                         token-mean log-prob
Rewards are β(π − ref), detached; accuracy is the fraction of pairs whose chosen reward is the
larger. At the first step policy = reference, z = 0 and the sigmoid loss is log 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, token_logprobs
from .packing import PackedLayout


@dataclass
class DPOLossConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo: bool = False
    nll_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar, differentiable
    losses: torch.Tensor  # [B] preference loss per pair (without the NLL term)
    chosen_rewards: torch.Tensor  # [B] detached
    rejected_rewards: torch.Tensor  # [B] detached

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float().mean()

    @property
    def margin(self) -> torch.Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    config: DPOLossConfig,
    chosen_token_mean: torch.Tensor | None = None,
) -> PreferenceOutput:
    """DPO / IPO loss of B pairs from summed log-probs `[B]` (policy ones carry gradients).

    `chosen_token_mean` (the policy's per-sequence token-mean log-prob of the chosen responses)
    is needed only when `config.nll_loss_coef` > 0.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if config.ipo:
        losses = (z - 1 / (2 * config.beta)) ** 2
    else:
        eps = config.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(config.beta * z) - eps * F.logsigmoid(-config.beta * z)
    loss = losses.mean()
    if config.nll_loss_coef > 0:
        if chosen_token_mean is None:
            raise ValueError("nll_loss_coef > 0 needs the chosen responses' token-mean log-probs")
        loss = loss - config.nll_loss_coef * chosen_token_mean.mean()
    return PreferenceOutput(
        loss=loss,
        losses=losses.detach(),
        chosen_rewards=config.beta * (policy_chosen - ref_chosen).detach(),
        rejected_rewards=config.beta * (policy_rejected - ref_rejected).detach(),
    )


def response_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, packed: PackedLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and token-mean log-probs of each sequence's targets: two fp32 `[N]` tensors.

    `hidden` is the final-norm output `[N, T, H]` and `targets` the batch's (`tokens.Batch`:
    already shifted, IGNORE_INDEX off the responses). Only response positions are projected onto
    the vocabulary (DPO prompts are long, replies short), slice by slice (`loss.token_logprobs`),
    so the full logits never exist. With `packed`, the rows are one packed row and the sums run
    over each sequence of it.
    """
    token = token_logprobs(hidden, lm_head_weight, targets)
    trained = targets != IGNORE_INDEX
    if packed is None:
        sums, counts = token.sum(dim=1), trained.sum(dim=1)
    else:
        sequence = packed.sequence_ids()
        zeros = torch.zeros(len(packed.cu_seqlens) - 1, device=token.device)
        sums = zeros.index_add(0, sequence, token[0])
        counts = zeros.index_add(0, sequence, trained[0].float())
    return sums, sums / counts.clamp(min=1)
