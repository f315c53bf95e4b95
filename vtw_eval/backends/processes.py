"""This process's place in a data-parallel launch, and the two collectives the backends use."""

from __future__ import annotations

import atexit

import torch
from accelerate import Accelerator


class Processes:
    """Rank and world size from accelerate (data-parallel launches set them), or from the process
    group when one was started: accelerate reports a single process for a multi-process launch on
    CPU, and the process group knows the truth."""

    def __init__(self) -> None:
        self.accelerator = Accelerator()
        if torch.distributed.is_initialized():
            # lmms-eval never tears the process group down; left to interpreter exit, a gloo rank
            # can abort ("terminate called without an active exception") and fail the launch.
            atexit.register(_destroy_process_group)
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes

    def device(self, device: str | None, device_map: str | None) -> torch.device:
        """The device ``device=`` names, else accelerate's; refused when it cannot be."""
        if device is not None and device_map:
            raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model; give one of them")
        chosen = torch.device(device) if device is not None else self.accelerator.device
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} is not accepted: this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use device=cpu or one of cuda:0..cuda:N-1"
            )
        return chosen

    def from_every_rank(self, value) -> list:
        """``value`` from every process, in rank order (``[value]`` in a single process)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def from_rank_zero(self, value):
        """Rank 0's ``value`` in every process."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
