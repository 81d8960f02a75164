"""``build-shards --distributor ray`` on a local Ray cluster of two nodes, one removed in the middle of the build;
its dedupe and shard tasks run on the cluster too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_shards import output_files, run_build

from helpers.media import many_images

pytest.importorskip("ray")

OPTS = ["--samples-per-shard", "16", "--image-size", "96", "--dedupe"]

# The driver: a head and a worker node (1 CPU each), the build in a thread, the worker node removed once 10 blocks
# are committed. Prints the cluster's nodes before, the blocks committed at removal, and the build's stats.
DRIVER = """
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from accord.shards.build import build, config_from_args, parser

out = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
nodes = len([n for n in ray.nodes() if n["Alive"]])
result = {}
cfg = config_from_args(parser().parse_args(sys.argv[2:]))
thread = threading.Thread(target=lambda: result.update(build(cfg)))
thread.start()
deadline = time.time() + 120
while time.time() < deadline and len(list(out.glob("_staging/blocks/*/block-*.json"))) < 10:
    time.sleep(0.01)
at_removal = len(list(out.glob("_staging/blocks/*/block-*.json")))
cluster.remove_node(worker)
thread.join()
ray.shutdown()
cluster.shutdown()
print(json.dumps({"nodes": nodes, "at_removal": at_removal, "stats": result}))
"""


@pytest.mark.slow
def test_ray_build_survives_a_lost_node_and_equals_a_one_node_build(tmp_path: Path) -> None:
    src = many_images(tmp_path / "many", 160, (640, 480))
    for i in range(8):  # duplicates for the dedupe tasks to find
        shutil.copy(src / f"{i:04d}.jpg", src / f"copy-{i}.jpg")
        (src / f"copy-{i}.txt").write_text(f"a copy of picture {i}")
    reference = tmp_path / "reference"
    run_build(src, reference, *OPTS)
    out = tmp_path / "ray"
    args = ["--input", str(src), "--output", str(out), "--quiet", "--distributor", "ray", *OPTS]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    n_blocks = -(-168 // report["stats"]["plan"]["block_size"])
    assert report["nodes"] == 2 and 10 <= report["at_removal"] < n_blocks  # removed in the middle
    assert (report["stats"]["written"], report["stats"]["duplicates"]) == (160, 8)
    assert output_files(out) == output_files(reference)


@pytest.mark.slow  # the build command
def test_ray_refuses_num_nodes(tmp_path: Path) -> None:
    proc = run_build(tmp_path, tmp_path / "out", "--distributor", "ray", "--num-nodes", "2", check=False)
    assert proc.returncode == 2 and "--distributor: ray spreads the blocks over its own cluster" in proc.stderr
