"""vmem: virtualised GPU memory for training convolutional networks in PyTorch.

Importing vmem touches no CUDA state; the device is read only when a profile, a meter or a
session asks for it.
"""

from __future__ import annotations

from . import models
from .config import Config
from .control import Plan
from .errors import BudgetTooSmall, OutOfBudget
from .session import session

__all__ = ["session", "Config", "Plan", "BudgetTooSmall", "OutOfBudget", "models"]
__version__ = "0.1.0"
