"""Convolutional segments (mmCNN): a convolution and the layers after it up to the next one.

Segments follow the real execution order, so a residual block's downsample convolution
starts a segment of its own and the residual add belongs to whichever segment it runs in.
Layers before the first convolution form segment 0 with it. A layer is a convolution by
behaviour (``LayerProfile.conv``: any ``_ConvNd`` module, subclasses included, or the aten
convolution operator running between modules), never by its class name.
"""

from __future__ import annotations

from ..preprocessing.profile import LayerProfile

__all__ = ["segment_of_layers"]


def segment_of_layers(layers: list[LayerProfile]) -> list[int]:
    """The segment index of every layer.

    Example::

        >>> from vmem import models
        >>> from vmem.preprocessing import profile_network
        >>> prof = profile_network(models.vgg11(), (1, 3, 32, 32))
        >>> segment_of_layers(prof.layers)[:6]  # conv relu pool | conv relu pool
        [0, 0, 0, 1, 1, 1]
    """
    segments, current, seen_conv = [], 0, False
    for layer in layers:
        if layer.conv:
            current += seen_conv  # the first convolution joins what came before it
            seen_conv = True
        segments.append(current)
    return segments
