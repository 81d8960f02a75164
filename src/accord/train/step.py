"""One optimiser step's forward/backward over k micro-batches, equal to one step on the k-times batch.

With k > 1 the contrastive batch is kept large as in GradCache / open_clip's accum-freq: (1) embed every
micro-batch without gradient, remembering the RNG state; (2) for each micro-batch, re-embed it with gradient under
the same RNG state, compute the loss over *all* micro-batches' embeddings (the others detached), and backpropagate.
Each pass sends gradient only into its own micro-batch's rows, so the k passes add up to the full gradient; the
temperatures (used by every pass) take gradient from the first pass only. A fusion head's matching loss sees the
token features of the live micro-batch only: it is the mean of the micro-batches' matching losses. The generative
head's caption loss is exact: each pass adds its micro-batch's tokens over the step's global token count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from accord.models.model import ModelOutput

Backward = Callable[[torch.Tensor], None]
PER_MICRO_BATCH = ("caption/", "caption_null/")  # loss parts each pass computes for its own micro-batch only


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def as_fp32(out: ModelOutput) -> ModelOutput:
    """The loss runs in fp32 (or the towers' fp64) whatever the towers' precision."""
    up = _at_least_fp32
    bias = {k: up(v) for k, v in out.logit_bias.items()} if out.logit_bias is not None else None
    return replace(
        out,
        embeddings={m: up(e) for m, e in out.embeddings.items()},
        logit_scale={k: up(v) for k, v in out.logit_scale.items()},
        logit_bias=bias,
        negatives=up(out.negatives) if out.negatives is not None else None,
    )


def _merge(outs: list[ModelOutput], live: ModelOutput, i: int) -> ModelOutput:
    """Embeddings of all micro-batches (only the i-th with gradient), hard negatives likewise; temperatures live
    in pass 0 only; token features and caption ids (the heads') of the i-th only, every one's caption token counts."""
    emb = {
        m: torch.cat([live.embeddings[m] if j == i else o.embeddings[m] for j, o in enumerate(outs)])
        for m in live.embeddings
    }
    present = {m: torch.cat([o.present[m] for o in outs]) for m in live.present}
    keep = (lambda t: t) if i == 0 else (lambda t: t.detach())
    scale = {k: keep(v) for k, v in live.logit_scale.items()}
    bias = {k: keep(v) for k, v in live.logit_bias.items()} if live.logit_bias is not None else None
    n = len(next(iter(live.present.values())))
    negatives, negative_present = _merge_negatives([live if j == i else o for j, o in enumerate(outs)])
    return ModelOutput(
        emb,
        present,
        scale,
        bias,
        live.pairs,
        tokens=live.tokens,
        token_mask=live.token_mask,
        token_rows=slice(i * n, (i + 1) * n),
        negatives=negatives,
        negative_present=negative_present,
        negative_tokens=live.negative_tokens,
        negative_token_mask=live.negative_token_mask,
        caption_ids=live.caption_ids,
        caption_mask=live.caption_mask,
        caption_targets=None if live.caption_targets is None else torch.cat([_targets(o) for o in outs]),
    )


def _targets(out: ModelOutput) -> torch.Tensor:
    assert out.caption_targets is not None, "every micro-batch of a step has the same heads"
    return out.caption_targets


def _merge_negatives(outs: list[ModelOutput]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The micro-batches' hard negatives in one [sum n, K, D] (a micro-batch without them, e.g. an epoch's filler,
    contributes zeros, all absent)."""
    have = [o for o in outs if o.negatives is not None]
    if not have:
        return None, None
    ref = have[0].negatives
    assert ref is not None
    parts, masks = [], []
    for o in outs:
        n = len(next(iter(o.present.values())))
        if o.negatives is None or o.negative_present is None:
            parts.append(ref.new_zeros(n, *ref.shape[1:]))
            masks.append(torch.zeros(n, ref.shape[1], dtype=torch.bool, device=ref.device))
        else:
            parts.append(o.negatives)
            masks.append(o.negative_present)
    return torch.cat(parts), torch.cat(masks)


def contrastive_step(
    model: Callable, loss_fn: Callable, micro_batches: list[dict], backward: Backward
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of one optimiser step; returns the loss of the last pass and the loss parts (detached):
    the contrastive ones of the last pass (each pass computes the whole step's), the caption ones
    (:data:`PER_MICRO_BATCH`) summed over the passes (each covers its own micro-batch's tokens)."""
    if len(micro_batches) == 1:
        loss, parts = loss_fn(as_fp32(model(micro_batches[0])))
        backward(loss)
        return loss.detach(), parts
    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state())
            cached.append(
                replace(
                    as_fp32(model(mb)),
                    tokens=None,
                    token_mask=None,
                    negative_tokens=None,
                    negative_token_mask=None,
                    caption_ids=None,
                    caption_mask=None,
                )
            )
    after = _rng_state()
    summed: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro_batches):
        _set_rng_state(states[i])
        loss, parts = loss_fn(_merge(cached, as_fp32(model(mb)), i))
        backward(loss)
        for k, v in parts.items():
            if k.startswith(PER_MICRO_BATCH):
                summed[k] = summed.get(k, 0.0) + v
    _set_rng_state(after)
    return loss.detach(), {**parts, **summed}


def accumulation_groups(
    batches: Iterator[dict[str, Any]], accum_steps: int, empty: Callable[[], dict[str, Any]]
) -> Iterator[list[dict[str, Any]]]:
    """Consecutive micro-batches in groups of ``accum_steps``, one group per optimiser step. The epoch's last group
    is filled up with ``empty()`` batches, so every rank makes the same number of micro-steps and DeepSpeed's
    accumulation boundary stays aligned."""
    while group := list(itertools.islice(batches, accum_steps)):
        yield group + [empty() for _ in range(accum_steps - len(group))]
