"""Zero-shot captioning: a language model that never saw an image, steered by the consistency score (MAGIC, Su et
al. 2022), and the retrieval baseline that returns the training caption most consistent with the medium (CLIPRe).

MAGIC decodes one token at a time. The language model's ``top_k`` most likely continuations ``v`` of the prefix are
scored by

    (1 - alpha) * p(v | prefix) - alpha * max_j cos(h_v, h_j) + beta * softmax_v(consistency(prefix + v) / tau)

where ``h`` are the model's last hidden states (``h_j`` of the prefix tokens, BOS included): the first two terms
are contrastive search (SimCTG), the degeneration penalty keeping the text from repeating itself; the last is the
magic score, the backbone's cosine of the partial caption with the medium, normalised over the candidates
(``tau`` 0.01 = CLIP's logit scale of 100). With ``beta = 0`` it is the language model's contrastive search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accord.captioning.decode import Decoded, constrain
from accord.captioning.guides import Scorer
from accord.captioning.model import Decoder, blank_memory
from accord.captioning.reward import Media
from accord.captioning.vocab import BOS, EOS, PAD


@torch.no_grad()
def magic(
    lm: Decoder,
    n: int,
    max_len: int,
    consistency: Scorer | None = None,
    media: Media | None = None,
    top_k: int = 5,
    alpha: float = 0.6,
    beta: float = 1.0,
    tau: float = 0.01,
) -> Decoded:
    """``n`` captions from the image-blind ``lm`` (a Captioner on :func:`blank_memory`), guided towards ``media``
    [n, D] by ``consistency`` when ``beta`` > 0."""
    if beta and (consistency is None or media is None):
        raise ValueError("magic: beta > 0 needs a consistency scorer and the media embeddings")
    lm.eval()
    param = next(lm.parameters())
    device, acc = param.device, torch.promote_types(param.dtype, torch.float32)  # scores in >= fp32
    memory, mask = blank_memory(n, lm.memory_width, device, param.dtype)
    seqs = torch.full((n, 1), BOS, dtype=torch.long, device=device)
    total = torch.zeros(n, device=device, dtype=acc)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    for t in range(max_len + 1):
        # p(v | prefix) over the allowed tokens (no BOS / PAD; EOS at the length limit; PAD once done)
        logp = constrain(lm(seqs, memory, mask)[:, -1].to(acc), done, t == max_len).log_softmax(-1)
        k = min(top_k, logp.shape[-1])
        cand_logp, cand = logp.topk(k, dim=-1)  # [n, k]
        extended = torch.cat([seqs.repeat_interleave(k, 0), cand.reshape(-1, 1)], dim=1)  # [n*k, t+2]
        hidden = F.normalize(
            lm.hidden(extended, memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)).to(acc), dim=-1
        )
        penalty = (hidden[:, :-1] @ hidden[:, -1:].transpose(1, 2))[..., 0].max(dim=1).values.view(n, k)
        score = (1 - alpha) * cand_logp.exp() - alpha * penalty
        if beta and consistency is not None and media is not None:
            cons = consistency.score(extended[:, 1:], media.repeat_interleave(k, 0)).to(acc).view(n, k)
            score = score + beta * (cons / tau).softmax(dim=-1)
        score = score.masked_fill(torch.isinf(cand_logp), float("-inf"))  # impossible continuations
        choice = score.argmax(dim=-1)
        token = torch.where(done, torch.full_like(choice, PAD), cand[rows, choice])
        total = total + torch.where(done, torch.zeros_like(total), cand_logp[rows, choice])
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        done = done | (token == PAD) | (token == EOS)
        if done.all():
            break
    return Decoded(seqs[:, 1:], total)


@torch.no_grad()
def retrieve_captions(
    media: torch.Tensor, caption_embeddings: torch.Tensor, captions: list[str]
) -> tuple[list[str], torch.Tensor]:
    """CLIPRe: for each medium [N, D], the caption of ``captions`` (the training captions, embedded [C, D]) whose
    embedding is most similar, and its index."""
    if len(captions) != len(caption_embeddings):
        raise ValueError(f"{len(captions)} captions but {len(caption_embeddings)} embeddings")
    best = (media.float() @ caption_embeddings.float().T).argmax(dim=1)
    return [captions[i] for i in best.tolist()], best
