"""``policy="recompute"`` on CIFAR ResNet-20 (batch 128, 32x32, SGD with momentum): its
measured minimum under half of plain's measured peak, and three steps bit-identical to
plain, dropout included."""

import pytest
import torch
from torch import nn

import vmem
from vmem import models
from vmem.meter import EmulatedMeter

SHAPE = (128, 3, 32, 32)


def _resnet20(dropout: bool):
    torch.manual_seed(0)
    model = models.resnet20(10)
    if dropout:  # dropout inside every residual block: the recomputation replays its masks
        for stage in (model.layer1, model.layer2, model.layer3):
            for block in stage:
                block.conv1 = nn.Sequential(block.conv1, nn.Dropout(0.2))
    return model


def _train(model, session=None, steps=3):
    """Three seeded steps, plain under a meter or under ``session(model, opt)``; the
    measured peak and the final parameters and buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the same dropout masks in both runs
    context = session(model, opt) if session else EmulatedMeter(torch.device("cpu"))
    with context:
        if not session:
            context.track([*model.parameters(), *model.buffers()])
        for _ in range(steps):
            x = torch.randn(SHAPE, generator=data)
            y = torch.randint(0, 10, (SHAPE[0],), generator=data)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return context.peak, [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("dropout", [False, True])
def test_recompute_halves_resnet20_and_stays_bit_identical(dropout):
    plain_peak, plain_state = _train(_resnet20(dropout))
    model = _resnet20(dropout)
    with pytest.raises(vmem.BudgetTooSmall) as sampled:  # planned up front from a sample
        with vmem.session(model, budget=1, policy="recompute", sample=torch.randn(SHAPE),
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.05,
                                                    momentum=0.9)):
            pass
    with pytest.raises(vmem.BudgetTooSmall) as refused:  # at the first forward, labels held
        _train(_resnet20(dropout), lambda m, o: vmem.session(
            m, optimizer=o, budget=sampled.value.minimum - 1, policy="recompute"))
    minimum = refused.value.minimum
    assert minimum <= 0.45 * plain_peak, (minimum, plain_peak)
    peak, state = _train(_resnet20(dropout), lambda m, o: vmem.session(
        m, optimizer=o, budget=minimum, policy="recompute"))
    assert peak <= minimum
    assert all(torch.equal(a, b) for a, b in zip(plain_state, state, strict=True))
