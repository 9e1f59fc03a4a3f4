"""Preprocessing (mmCNN's first module): what the hardware offers and what the network costs.

- :mod:`.hardware` reads the device through NVML and measures the host link and compute rate,
  or describes the emulated device where there is no GPU;
- :mod:`.profile` lists the network's layers in execution order with shapes, saved bytes,
  FLOPs, memory and, on a real device, times.
"""

from .profile import LayerProfile, NetworkProfile, profile_network

__all__ = ["LayerProfile", "NetworkProfile", "profile_network"]
