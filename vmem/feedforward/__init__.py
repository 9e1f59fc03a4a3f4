"""Feed-forward (mmCNN's third module): carries out a plan while the model trains.

- :mod:`.offload` packs and unpacks saved tensors by the plan, over the transfer backend;
- :mod:`.pools` holds the pinned host pool and the staging pool (the resident pool is
  PyTorch's caching allocator, accounted by the plan).
"""

from .offload import OffloadExecutor, TransferCounters
from .pools import HostPool, StagingPool

__all__ = ["HostPool", "OffloadExecutor", "StagingPool", "TransferCounters"]
