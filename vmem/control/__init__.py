"""Control (mmCNN's second module): from a profile and a budget to a plan.

- :mod:`.segments` splits the execution order into convolutional segments;
- :mod:`.memory` predicts the device-memory curve of any offload choice from the profile's
  timeline, and each segment's peak ``Memmax``;
- :mod:`.planner` chooses per saved tensor keep or offload, and the prefetch distance
  (mmCNN's Convolutional Part Number), under the budget; fixed policies from vDNN too;
- :mod:`.simulator` plays a plan on the compute and copy streams: predicted time, memory
  over time, a trace;
- :mod:`.blocks` finds the blocks a profiled model can recompute, and what each frees;
- :mod:`.splitting` chooses how many parts each run of layers is split into (mmCNN's Self
  Part Number) when no offload plan fits;
- :mod:`.plan` is the result: a dataclass with a JSON round-trip and a table.
"""

from .plan import Plan, RecomputeDecision, SaveDecision, SegmentPlan
from .planner import make_plan

__all__ = ["Plan", "RecomputeDecision", "SaveDecision", "SegmentPlan", "make_plan"]
