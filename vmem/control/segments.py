"""Convolutional segments (mmCNN): a convolution and the layers after it up to the next one.

Segments follow the real execution order, so a residual block's downsample convolution
starts a segment of its own and the residual add belongs to whichever segment it runs in.
Layers before the first convolution form segment 0 with it.
"""

from __future__ import annotations

from ..preprocessing.profile import LayerProfile

__all__ = ["CONV_KINDS", "segment_of_layers"]

CONV_KINDS = frozenset({"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                        "ConvTranspose3d",
                        "SplitRun"})  # convolutions run split (vmem.feedforward.split_runs)


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
        if layer.kind in CONV_KINDS:
            current += seen_conv  # the first convolution joins what came before it
            seen_conv = True
        segments.append(current)
    return segments
