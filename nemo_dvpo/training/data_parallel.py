"""Data parallelism as recipes see it: this rank's share of the work and the reduction of what it measured.

Recipes never import ``parallel_state``: they ask a :class:`DataParallel` for their rank, their shard of
a global list, token counts summed over ranks, and metric means. Every reduction here takes a fixed,
sorted list of names on every rank - a metric that only some ranks can compute (the verifiable score of
prompts that carry verifiable fields) travels as a (sum, count) pair that every rank contributes to, so
all ranks always reduce the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    rank: int
    size: int
    group: Optional[dist.ProcessGroup]

    @classmethod
    def from_parallel_state(cls) -> "DataParallel":
        """The data-parallel group of megatron-core's global parallel state (after initialisation)."""
        from megatron.core import parallel_state

        size = parallel_state.get_data_parallel_world_size()
        return cls(rank=parallel_state.get_data_parallel_rank(), size=size,
                   group=parallel_state.get_data_parallel_group() if size > 1 else None)

    @classmethod
    def single(cls) -> "DataParallel":
        return cls(rank=0, size=1, group=None)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (whose length the size divides)."""
        if len(items) % self.size:
            raise ValueError(f"{len(items)} items do not split over {self.size} data-parallel ranks")
        per_rank = len(items) // self.size
        return list(items[self.rank * per_rank:(self.rank + 1) * per_rank])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the data-parallel ranks (a new tensor; the input is left alone)."""
        tensor = tensor.clone()
        if self.group is None:
            return tensor
        from nemo_dvpo.utils.distributed import all_reduce_on_device

        return all_reduce_on_device(tensor, group=self.group)

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each metric over ranks; every rank must pass the same names."""
        if self.group is None or not metrics:
            return dict(metrics)
        names = sorted(metrics)
        values = self.sum(torch.tensor([metrics[name] for name in names], dtype=torch.float64))
        return dict(zip(names, (values / self.size).tolist()))

    def ratio(self, numerators: dict[str, float], denominators: dict[str, float]) -> dict[str, float]:
        """``sum over ranks of numerator / sum over ranks of denominator`` per name; names whose total
        denominator is 0 are left out (on every rank alike)."""
        names = sorted(numerators)
        if sorted(denominators) != names:
            raise ValueError("numerators and denominators must have the same names")
        stacked = torch.tensor([[numerators[name], denominators[name]] for name in names], dtype=torch.float64)
        totals = self.sum(stacked) if names else stacked
        return {name: float(total / count) for name, (total, count) in zip(names, totals.tolist()) if count > 0}

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every data-parallel rank, in rank order."""
        if self.group is None:
            return [obj]
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered
