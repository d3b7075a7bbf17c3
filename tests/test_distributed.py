"""Every rank ends with rank 0's codebook, with torch.distributed on gloo (2 CPU processes)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from quant_noise_plugin.compressed import attach_pq_plan, fit_pq
from quant_noise_plugin.schedule import LayerPlan


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different weights and k-means seeds per rank on purpose
    model = nn.Sequential(nn.Linear(32, 64))
    plan = LayerPlan(["0"], "Linear", [64, 32], 4, 16)
    attach_pq_plan(model, plan)
    fit_pq(model, plan, n_iter=5, seed=rank, backend="torch")
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_codebooks_are_identical_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(a["0.weight_pq.centroids"], b["0.weight_pq.centroids"])
    assert torch.equal(a["0.weight_pq.codes"], b["0.weight_pq.codes"])
