"""Where a run works: one process per GPU under torchrun (DDP, NCCL) or one process on CPU/GPU."""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

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
    """(torch.device, parameter dtype): `auto` is cuda + bfloat16 with a GPU, else cpu + float32."""
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; "
                          "use --device cpu (or auto)")
    dtype = ("bfloat16" if gpu else "float32") if dtype == "auto" else dtype
    return torch.device("cuda", local_rank) if gpu else torch.device("cpu"), getattr(torch, dtype)


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on GPU: the LoRA masters stay fp32, the compute runs in bf16."""
    bf16 = device.type == "cuda" and dtype == torch.bfloat16
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
