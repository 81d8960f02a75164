"""Distributed training under DeepSpeed ZeRO: ``python -m accord.train --config ...``."""
