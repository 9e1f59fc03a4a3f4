"""Feed-forward (mmCNN's third module): carries out a plan while the model trains.

- :mod:`.install` puts a plan in force on a model (``install(model, plan, pools,
  backend) -> Installed``) and takes it away: the entry point the session uses;
- :mod:`.offload` packs and unpacks saved tensors by the plan, over the transfer backend;
- :mod:`.pools` holds the pinned host pool and the staging pool (the resident pool is
  PyTorch's caching allocator, accounted by the plan);
- :mod:`.split` runs a chain of layers in parts, exactly (or Split-CNN's way);
- :mod:`.blocks` recomputes any block (a submodule, or a stretch of an ``nn.Sequential``)
  in backward through PyTorch's non-reentrant checkpoint, installed by hooks;
- :mod:`.recompute` recomputes a run's cheap layers (BatchNorm, activations) in backward;
- :mod:`.split_runs` finds a model's splittable runs and installs the plan's splits;
- :mod:`.stream` keeps split runs' inputs in the host pool, fetched back part by part.
"""

from .install import Installed, Pools, install
from .offload import OffloadExecutor, TransferCounters
from .pools import HostPool, StagingPool

__all__ = ["HostPool", "Installed", "OffloadExecutor", "Pools", "StagingPool",
           "TransferCounters", "install"]
