"""Where the work runs: one process per GPU under torchrun (DDP, NCCL) or one process on CPU/GPU,
the device and dtype of a run, and bf16 autocast on GPU."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", dtype: str = "auto", local_rank: int = 0):
    """(torch.device, parameter dtype): `auto` is cuda + bfloat16 when a GPU is present, else
    cpu + float32."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else "float32"
    return (torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu"),
            getattr(torch, dtype))


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def autocast(device: torch.device, dtype: torch.dtype):
    """The context a forward runs in: bf16 autocast on GPU (fp32 LoRA masters, bf16 compute)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
