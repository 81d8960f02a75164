"""Run by torchrun (2 gloo ranks) from test_interop.py: each rank updates ConsistencyMetrics (one per mode) with
its share of the samples (uneven shares, in two batches); rank 0 writes what compute() gives on each rank."""

import json
import sys

import torch
import torch.distributed as dist

from accord import collectives
from accord.consistency import ConsistencyMetric, ConsistencyScorer

backbone, out, *texts = sys.argv[1:]
MODES = ("clipscore", "torchmetrics", "cosine")
dist.init_process_group("gloo")
collectives.install_audit()  # every collective checked (accord.collectives)
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for _ in texts]
mine = [0, 1] if rank == 0 else list(range(2, len(texts)))
scorer = ConsistencyScorer.from_pretrained(backbone)
values = {}
for mode in MODES:
    metric = ConsistencyMetric(scorer, mode=mode)
    for chunk in (mine[:1], mine[1:]):
        metric.update(text=[texts[i] for i in chunk], image=[images[i] for i in chunk])
    values[mode] = metric.compute().item()
gathered = [None, None]
dist.all_gather_object(gathered, values)
if rank == 0:
    with open(out, "w") as f:
        json.dump(gathered, f)
dist.destroy_process_group()
