"""GRPO's math on token batches (DeepSeekMath's group-relative policy optimization, PPO-clipped).

For a group of G completions of one prompt with rewards r: advantage A_i = (r_i - mean(r)) / (std(r) + eps),
shared by every token of completion i. Per token, with the trainer's log-probability l and the rollout engine's
l_old: ratio = exp(l - l_old), surrogate = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A). The loss is the
negative surrogate averaged over all completion tokens of the batch (token-level, as DAPO recommends), plus
`kl_coef` times the k3 estimate of KL to a reference model when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayfleet.actors.rl.samples import SampleGroup


@dataclass
class TokenBatch:
    """Right-padded prompt + completion rows and, per row, which positions are completion tokens."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T - 1], True where target token t + 1 is a completion token
    targets: torch.Tensor  # [B, T - 1], input_ids shifted left
    old_logprobs: torch.Tensor  # [B, T - 1], the rollout engine's, 0 off the completion
    advantages: torch.Tensor  # [B], one per row
    versions: torch.Tensor  # [B], the sample's oldest token version


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    values = torch.tensor(rewards, dtype=torch.float64)
    std = values.std(unbiased=False) if len(rewards) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return ((values - values.mean()) / (std + eps)).tolist()


def build_batch(groups: list[SampleGroup], pad_token_id: int) -> TokenBatch:
    rows, old, completion_starts, advantages, versions = [], [], [], [], []
    for group in groups:
        for sample, advantage in zip(group.samples, group_advantages(group.rewards)):
            rows.append(list(sample.prompt_token_ids) + list(sample.completion_token_ids))
            old.append(sample.rollout_logprobs)
            completion_starts.append(len(sample.prompt_token_ids))
            advantages.append(advantage)
            versions.append(sample.version)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    old_logprobs = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, start, logprobs) in enumerate(zip(rows, completion_starts, old)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        # Logits at position p predict token p + 1: completion tokens start..len-1 are predicted at start-1..len-2.
        completion_mask[i, start - 1: len(row) - 1] = True
        old_logprobs[i, start - 1: len(row) - 1] = torch.tensor(logprobs, dtype=torch.float32)
    return TokenBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                      targets=input_ids[:, 1:], old_logprobs=old_logprobs,
                      advantages=torch.tensor(advantages, dtype=torch.float32),
                      versions=torch.tensor(versions, dtype=torch.long))


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T - 1] log-probabilities of each next token under `model` (sampling temperature applied, as the
    rollout engine sampled)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor
    clipped_fraction: float
    mean_ratio: float
    kl: float


def grpo_loss(logprobs: torch.Tensor, batch: TokenBatch, clip_eps: float, kl_coef: float = 0.0,
              ref_logprobs: torch.Tensor | None = None) -> LossParts:
    mask = batch.completion_mask
    ratio = torch.exp(logprobs - batch.old_logprobs)
    advantage = batch.advantages.unsqueeze(-1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if kl_coef and ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / tokens
    with torch.no_grad():
        clipped_fraction = (((ratio - 1.0).abs() > clip_eps) & mask).sum() / tokens
        mean_ratio = (ratio * mask).sum() / tokens
        mean_kl = (kl * mask).sum() / tokens
    return LossParts(loss=loss, clipped_fraction=float(clipped_fraction), mean_ratio=float(mean_ratio),
                     kl=float(mean_kl))
