"""Which process am I, how many are there, which device, wait for everyone: one helper over ``accelerate``.

Entry points run alone or under ``accelerate launch`` (several processes, one per device, or gloo processes on
the CPU). accelerate has one quirk that every caller must handle the same way: on a machine without an
accelerator, ``PartialState()`` / ``Accelerator()`` without ``cpu=True`` forms no process group and silently
treats every launched process as rank 0 of 1, so all of them would do all the work and write the same files.
:func:`needs_cpu_flag` says when to pass ``cpu=True`` and :func:`check_process_count` catches the fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


def needs_cpu_flag(device: str | torch.device | None = None) -> bool:
    """Whether accelerate must be created with ``cpu=True``: the CPU was asked for or no accelerator is present."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_accelerator or (device is not None and torch.device(device).type == "cpu")


def check_process_count(num_processes: int) -> None:
    """Raise if accelerate sees another number of processes than the launcher started (``WORLD_SIZE``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {num_processes}")


@dataclass
class ProcessContext:
    """This process's rank among ``world`` (``accelerate launch`` or a single process) and its share of the work."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @classmethod
    def current(cls, device: str | None = None) -> ProcessContext:
        """From ``accelerate.PartialState`` (a plain single process when not launched by accelerate).

        ``device`` is the user's ``--device``; processes on the CPU get a gloo group (see the module docstring).
        """
        from accelerate import PartialState

        state = PartialState(cpu=needs_cpu_flag(device))
        check_process_count(state.num_processes)
        return cls(state.process_index, state.num_processes, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, sample_id: int) -> bool:
        """Sample ``sample_id`` belongs to rank ``sample_id % world``."""
        return sample_id % self.world == self.rank

    def wait(self) -> None:
        """Barrier: return once every process got here (nothing to wait for alone)."""
        if self.world > 1 and self.state is not None:
            self.state.wait_for_everyone()

    def device(self, requested: torch.device | None) -> torch.device | None:
        """The user's device, else accelerate's per-process device when several processes run (cuda:local_rank)."""
        if requested is not None or self.world == 1 or self.state is None:
            return requested
        return self.state.device
