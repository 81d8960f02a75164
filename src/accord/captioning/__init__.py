"""Consistency-guided captioning: a small caption decoder on accord tower features (or the backbone's generative
head, :class:`HeadCaptioner`), decoding strategies (greedy,
beam, nucleus, N-best reranking, consistency-guided beam with the cosine or the fused score) and training strategies
(MLE, MLE + differentiable consistency loss, self-critical sequence training with the consistency score as reward);
zero-shot baselines (MAGIC decoding of an image-blind language model, CLIPRe retrieval). The captioning world and
its referee are in :mod:`accord.worlds`."""

from accord.captioning.decode import DecodeConfig, generate
from accord.captioning.model import Captioner, CaptionerConfig, HeadCaptioner
from accord.captioning.reward import CaptionConsistency
from accord.captioning.train import CaptionTrainConfig, train_captioner
from accord.captioning.vocab import CaptionVocab

__all__ = [
    "CaptionConsistency",
    "CaptionTrainConfig",
    "Captioner",
    "CaptionerConfig",
    "CaptionVocab",
    "DecodeConfig",
    "HeadCaptioner",
    "generate",
    "train_captioner",
]
