"""Evaluation of aligned encoders, used by the trainer's periodic evaluation and by ``accord eval`` alike.

- ``embed``: embed every sample of a loader (one process, or gathered across ranks in lock-step)
- ``retrieval``: recall@k per pair and direction, fusion reranking
- ``zeroshot``: prompt-ensembled zero-shot classification (top-k, mean per-class recall, confusion)
- ``plots``: similarity and confusion matrices
- ``evaluate``: an exported backbone on shards (``accord eval``)
"""
