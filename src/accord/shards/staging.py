"""Where a shard build keeps its work in progress: the layout of ``OUT/_staging``.

``plan.json`` (the options and inputs the build was started with), ``inputs-complete`` (the blocks' inputs are all
written), ``nodes/node-R.jsonl`` (each node's progress log) and, per block N, in a folder of
:data:`BLOCKS_PER_FOLDER` blocks (``blocks/NNN/``, so that no folder holds more than a few thousand files at 100M
inputs): ``block-N.inputs.jsonl`` (its inputs, one :class:`~accord.shards.sources.SampleSource` per line),
``block-N.tar`` and ``block-N.json`` (its converted samples and commit record) and, on a shared-folder build,
``block-N.claim`` (the node converting it); per final shard N, ``pack/NNN/shard-N.json`` (the samples it takes from
which blocks).
"""

from __future__ import annotations

STAGING = "_staging"
BLOCKS_PER_FOLDER = 1000


def block_folder(staging: str, block: int) -> str:
    return f"{staging}/blocks/{block // BLOCKS_PER_FOLDER:03d}"


def block_path(staging: str, block: int, suffix: str) -> str:
    """``staging/blocks/NNN/block-NNNNNN.{suffix}`` (suffix: ``inputs.jsonl``, ``tar``, ``json``, ``claim``)."""
    return f"{block_folder(staging, block)}/block-{block:06d}.{suffix}"


def committed_glob(staging: str) -> str:
    """A glob of every block's commit record."""
    return f"{staging}/blocks/*/block-*.json"


def shard_plan_path(staging: str, shard: int) -> str:
    """``staging/pack/NNN/shard-NNNNNN.json``: which samples of which blocks final shard N holds."""
    return f"{staging}/pack/{shard // BLOCKS_PER_FOLDER:03d}/shard-{shard:06d}.json"
