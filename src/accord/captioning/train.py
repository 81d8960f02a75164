"""Training strategies for the caption decoder (the backbone stays frozen):

- ``mle``: teacher-forced cross-entropy.
- ``consistency``: MLE + ``weight * (1 - cos)`` of the *soft* caption: the decoder's teacher-forced distributions
  (expected input embeddings, or straight-through Gumbel-softmax one-hots) through the text tower, against the
  medium's embedding - differentiable in the decoder parameters.
- ``scst``: self-critical sequence training (Rennie et al. 2017): sample a caption, reward = its consistency score
  minus the greedy caption's, policy gradient on the sample's log-probability (+ an optional MLE term).
  Start it from an MLE-trained decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from accord.captioning.data import CaptionData
from accord.captioning.decode import greedy, sample
from accord.captioning.guides import Scorer
from accord.captioning.model import Decoder
from accord.captioning.reward import CaptionConsistency
from accord.captioning.vocab import BOS, EOS, PAD


@dataclass
class CaptionTrainConfig:
    """How :func:`train_captioner` trains the decoder."""

    strategy: Literal["mle", "consistency", "scst"] = "mle"
    """MLE; MLE + the differentiable consistency loss; self-critical sequence training with the score as reward."""
    epochs: int = 30
    """Passes over the training captions."""
    batch_size: int = 32
    """Captions per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this."""
    consistency_weight: float = 1.0
    """consistency: weight of (1 - cos) of the soft caption."""
    soft: Literal["expected", "gumbel"] = "expected"
    """consistency: how tokens stay differentiable (expected embedding, or straight-through Gumbel-softmax)."""
    gumbel_tau: float = 1.0
    """consistency with gumbel: the Gumbel-softmax temperature."""
    scst_mle_weight: float = 0.0
    """scst: weight of the MLE term kept beside the policy gradient."""
    seed: int = 0
    """Seeds the initial weights, the batch order and sampling."""


def mle_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] of inputs targets[:, :-1] predicting targets[:, 1:]."""
    return F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=PAD)


def sequence_logp(model: Decoder, seqs: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of EOS-terminated ``seqs`` [M, T] (no BOS); PAD positions excluded."""
    inputs = torch.cat([torch.full_like(seqs[:, :1], BOS), seqs[:, :-1]], dim=1)
    logp = model(inputs, memory, mask).float().log_softmax(-1).gather(2, seqs[..., None])[..., 0]
    return (logp * (seqs != PAD)).sum(-1)


def _step_loss(
    model: Decoder, batch: tuple[torch.Tensor, ...], cfg: CaptionTrainConfig, consistency: Scorer | None
) -> tuple[torch.Tensor, dict[str, float]]:
    memory, mask, media, targets = batch
    if cfg.strategy == "scst" and consistency is not None:  # (train_captioner refuses scst without one)
        model.eval()
        max_len = targets.shape[1] - 2
        drawn = sample(model, memory, mask, max_len).seqs
        baseline = greedy(model, memory, mask, max_len).seqs
        with torch.no_grad():
            reward = consistency.score(drawn, media)
            advantage = reward - consistency.score(baseline, media)
        model.train()
        loss = -(advantage * sequence_logp(model, drawn, memory, mask)).mean()
        logs = {"reward": float(reward.mean()), "advantage": float(advantage.mean())}
        if cfg.scst_mle_weight:
            ce = mle_loss(model(targets[:, :-1], memory, mask), targets)
            loss = loss + cfg.scst_mle_weight * ce
            logs["mle"] = float(ce.detach())
        return loss, logs
    logits = model(targets[:, :-1], memory, mask)
    loss = mle_loss(logits, targets)
    logs = {"mle": float(loss.detach())}
    if cfg.strategy == "consistency" and isinstance(consistency, CaptionConsistency):
        words = (targets[:, 1:] != PAD) & (targets[:, 1:] != EOS)
        if cfg.soft == "gumbel":
            probs = F.gumbel_softmax(logits.float(), tau=cfg.gumbel_tau, hard=True)
        else:
            probs = logits.float().softmax(-1)
        cos = consistency.soft_score(probs, words, media)
        loss = loss + cfg.consistency_weight * (1 - cos).mean()
        logs["soft_consistency"] = float(cos.detach().mean())
    return loss, logs


def train_captioner(
    model: Decoder,
    data: CaptionData,
    cfg: CaptionTrainConfig,
    consistency: Scorer | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train in place and leave the model in eval mode (decoding with dropout on would be random); returns per-epoch
    mean logs. ``consistency``: SCST's reward (any :class:`~accord.captioning.guides.Scorer`, e.g. a fluency-guarded
    cosine), or the soft loss's score (a :class:`CaptionConsistency`: its soft captions go through the text tower)."""
    if cfg.strategy != "mle" and consistency is None:
        raise ValueError(f"training strategy {cfg.strategy!r} needs a consistency score")
    if cfg.strategy == "consistency" and not isinstance(consistency, CaptionConsistency):
        raise ValueError("the consistency loss needs a CaptionConsistency (it scores soft captions)")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tensors = (data.memory, data.mask, data.media, data.targets)
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"train captioner ({cfg.strategy})", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        sums: dict[str, float] = {}
        order = torch.randperm(len(data), generator=generator)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(data), cfg.batch_size)]
        for idx in batches:
            loss, logs = _step_loss(model, tuple(t[idx] for t in tensors), cfg, consistency)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
        history.append({k: v / len(batches) for k, v in sums.items()})
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
    model.eval()
    return history
