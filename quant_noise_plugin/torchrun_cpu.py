"""fairseq's multi-process training on CPUs, launched by torchrun (glue).

Under torchrun, fairseq reads RANK / WORLD_SIZE from the environment and picks the process's GPU as
``rank % torch.cuda.device_count()``, which divides by zero on a machine without one (and a device
id above 0 then makes it call ``torch.cuda.set_device``). On such a machine there is no device to
pick (``--cpu``, gloo): the id stays 0. With GPUs fairseq's own code runs unchanged. Pass ``--distributed-world-size N`` (fairseq's default,
the GPU count, is 1 on a CPU machine and would not start the distributed engine).
"""
from __future__ import annotations

import os

import torch


def allow_torchrun_without_gpus() -> None:
    from fairseq.distributed import utils

    original = utils._infer_torch_distributed_launch_init
    if getattr(original, "_qn_cpu", False):
        return

    def infer(cfg) -> None:
        if torch.cuda.device_count():
            return original(cfg)
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = 0
        cfg.distributed_no_spawn = True  # torchrun made the processes

    infer._qn_cpu = True
    utils._infer_torch_distributed_launch_init = infer
