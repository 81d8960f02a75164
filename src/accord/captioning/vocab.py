"""The caption vocabulary: the backbone tokenizer's ids that occur in the training captions, plus PAD/BOS/EOS.

Generated tokens are tokenizer ids, so a caption goes to the backbone's text tower without re-tokenising, and soft
tokens (probabilities over this vocabulary) map to the text tower's input embeddings by a row lookup.
"""

from __future__ import annotations

from typing import Any

import torch

PAD, BOS, EOS = 0, 1, 2


class CaptionVocab:
    def __init__(self, tokenizer: Any, captions: list[str]):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.eos_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        specials = {self.bos_id, self.eos_id, self.pad_id}
        used = sorted({t for c in captions for t in self._ids(c)} - specials)
        # generator index -> tokenizer id; PAD/BOS/EOS first
        self.token_ids = torch.tensor([self.pad_id, self.bos_id, self.eos_id, *used])
        self.index = {t: i for i, t in enumerate(used, start=3)}

    def _ids(self, caption: str) -> list[int]:
        return self.tokenizer(caption, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.token_ids)

    def encode(self, captions: list[str], max_len: int) -> torch.Tensor:
        """[B, max_len + 2]: BOS, words (unknown words dropped, length capped), EOS, PAD."""
        out = torch.full((len(captions), max_len + 2), PAD, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [self.index[t] for t in self._ids(c) if t in self.index][:max_len]
            out[i, : len(ids) + 2] = torch.tensor([BOS, *ids, EOS])
        return out

    def decode(self, seqs: torch.Tensor | list[list[int]]) -> list[str]:
        """Generator indices (BOS/EOS/PAD anywhere) -> strings; stops at the first EOS."""
        out = []
        for seq in seqs:
            words = []
            for t in seq.tolist() if torch.is_tensor(seq) else seq:
                if t == EOS:
                    break
                if t not in (PAD, BOS):
                    words.append(int(self.token_ids[t]))
            out.append(self.tokenizer.decode(words, skip_special_tokens=True).strip())
        return out
