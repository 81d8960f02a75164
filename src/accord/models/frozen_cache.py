"""Features of a frozen tower computed once per distinct input and reused (LiT's locked tower, without a separate
precomputation pass).

A backbone with no trainable parameter and no active dropout is a function of its input alone, so its pooled
features for a caption that recurs can be kept and reused. For the reuse to be *exact*, the features must not
depend on what else was in the batch, and on CPU they do: BLAS picks other kernels for other matrix shapes and
attention sums over the batch's padded length, so the same caption embeds differently (by ~1e-6) in different
batches. Every input is therefore computed in a fixed shape: in chunks of exactly ``CHUNK`` rows (a short chunk is
filled with copies of its first row), a caption padded to its own length rounded up to ``LENGTH_STEP`` tokens, or to
the backbone's position limit where that is lower (CLIP's 77: a 73-token caption is computed in 77 positions, not
80), the same padding whatever its neighbours; mask zero on it.
A cached run and a run that keeps nothing (``max_items=0``) then give bit-identical features, losses and
gradients; both differ from an ordinary padded batch forward by float noise only.

With ``per_token`` the cache keeps a caption's *token states* [length, W] instead of one pooled vector: the output
of a text tower's frozen bottom layers (a cut-layer tower, ``unfreeze_last_n``), on which its trainable top layers
run every step. The same fixed shapes make them exact in the same way.

Keys are BLAKE2b-128 digests of each row's bytes, shape and dtype.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

CHUNK = 8  # rows per backbone call: the fixed shape every input is computed in
LENGTH_STEP = 8  # text: each caption is padded to its length rounded up to a multiple of this (always the same)

# (backbone inputs of one chunk, text mask or None) -> pooled features [CHUNK, W] (per_token: states [CHUNK, L, W])
RunFn = Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor]


def row_key(row: dict[str, torch.Tensor]) -> bytes:
    """BLAKE2b-128 of a row's tensors (on the CPU: :meth:`FrozenFeatureCache.__call__` copies a batch over once)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(row):
        t = row[name].detach().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class FrozenFeatureCache:
    """Pooled features of a frozen backbone per distinct input, up to ``max_items`` (least recently used first
    out; 0 keeps nothing and recomputes every input in the same fixed shape). ``text`` rows are trimmed to their
    attention mask before keying and computing; ``per_token`` (text only) keeps each caption's token states, returned
    padded with zeros to the batch's length."""

    def __init__(
        self, run: RunFn, max_items: int, text: bool, per_token: bool = False, max_positions: int | None = None
    ):
        if per_token and not text:
            raise ValueError("per-token features are cached for text towers only")
        self.run, self.max_items, self.text, self.per_token = run, max_items, text, per_token
        self.max_positions = max_positions  # text: the backbone's position embeddings (padding never goes past)
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.lookups = 0

    def _rows(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> list[dict[str, torch.Tensor]]:
        n = next(iter(inputs.values())).shape[0]
        if not self.text:
            return [{k: v[i] for k, v in inputs.items()} for i in range(n)]
        lengths = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * n
        return [{"input_ids": inputs["input_ids"][i, : int(length)]} for i, length in enumerate(lengths)]

    def _shape(self, row: dict[str, torch.Tensor]) -> tuple:
        """The shape a row is computed in: text rounded up to a multiple of LENGTH_STEP tokens, at most
        ``max_positions`` (padding masked)."""
        if self.text:
            width = -(-len(row["input_ids"]) // LENGTH_STEP) * LENGTH_STEP
            if self.max_positions is not None:
                width = min(width, max(self.max_positions, len(row["input_ids"])))
            return (width,)
        return tuple((k, tuple(v.shape)) for k, v in sorted(row.items()))

    @torch.no_grad()
    def _compute(self, rows: list[dict[str, torch.Tensor]], shape: tuple) -> list[torch.Tensor]:
        """Features of ``rows`` (all of ``shape``), CHUNK rows per call."""
        out: list[torch.Tensor] = []
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            chunk = chunk + [chunk[0]] * (CHUNK - len(chunk))
            if self.text:
                (width,) = shape
                ids = torch.zeros(CHUNK, width, dtype=chunk[0]["input_ids"].dtype, device=chunk[0]["input_ids"].device)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(chunk):
                    ids[i, : len(r["input_ids"])] = r["input_ids"]
                    mask[i, : len(r["input_ids"])] = 1
                batch = {"input_ids": ids}
            else:
                batch, mask = {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}, None
            features = self.run(batch, mask)[: len(rows) - start].unbind(0)
            if self.per_token:  # each caption's own tokens, not the chunk's padding
                features = tuple(f[: len(r["input_ids"])].clone() for f, r in zip(features, chunk, strict=False))
            out.extend(features)
        return out

    def __call__(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features [B, W] of a batch of backbone inputs (text: ``input_ids`` with its ``mask``); per token:
        states [B, L, W], L the batch's padded length, zeros past each caption's end."""
        rows = self._rows(inputs, mask)
        on_cpu = self._rows({k: v.detach().cpu() for k, v in inputs.items()}, mask)  # one copy, not one per row
        keys = [row_key(r) for r in on_cpu]
        self.lookups += len(keys)
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, dict[str, torch.Tensor]] = {}
        for key, row in zip(keys, rows, strict=True):
            if key in found or key in missing:
                continue
            cached = self.store.get(key)
            if cached is None:
                missing[key] = row
            else:
                self.store.move_to_end(key)
                found[key] = cached
        self.hits += sum(key in found for key in keys)
        by_shape: dict[tuple, list[bytes]] = {}
        for key, row in missing.items():
            by_shape.setdefault(self._shape(row), []).append(key)
        for shape, group in by_shape.items():
            for key, feature in zip(group, self._compute([missing[k] for k in group], shape), strict=True):
                found[key] = feature
                if self.max_items:
                    self.store[key] = feature
        while len(self.store) > self.max_items:
            self.store.popitem(last=False)
        if self.per_token:
            length = inputs["input_ids"].shape[1]
            return torch.stack([F.pad(found[k], (0, 0, 0, length - found[k].shape[0])) for k in keys])
        return torch.stack([found[k] for k in keys])

    def stats(self) -> dict[str, float]:
        """Hit rate and size since the last call (the counters restart)."""
        out = {"hit_rate": self.hits / self.lookups if self.lookups else 0.0, "items": len(self.store)}
        self.hits = self.lookups = 0
        return out


def active_dropout(backbone: torch.nn.Module) -> str | None:
    """The first source of randomness in a backbone's training-mode forward (a dropout or layer-drop rate > 0 in
    its config or modules), or None."""
    config = getattr(backbone, "config", None)
    for name, value in config.to_dict().items() if config is not None else []:
        if ("dropout" in name or "layerdrop" in name) and isinstance(value, (int, float)) and value > 0:
            return f"config.{name} = {value}"
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{name} (p = {module.p})"
    return None
