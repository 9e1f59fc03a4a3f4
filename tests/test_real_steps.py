"""Steps as users really write them, at 0.75x and 0.5x of plain PyTorch's measured peak.

Plain PyTorch is measured with the meter entered before the model is built (the model, the
optimizer's state, the data and the loss all count); vmem's every step must stay within
the budget and its final parameters must equal plain's bit for bit.
"""

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import vmem
from vmem import models
from vmem.meter import EmulatedMeter
from vmem.models.vgg import _make_features

BATCH, STEPS = 64, 2
FRACTIONS = [0.75, 0.5]


def _data(steps=STEPS, batch=BATCH, labels=(10,)):
    """Seeded batches, made one at a time as a data loader does."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (torch.randn(batch, 3, 32, 32, generator=g),
               torch.randint(0, labels[0], (batch, *labels[1:]), generator=g))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _resnet20():
    torch.manual_seed(0)
    return models.resnet20(10)


def _step_plain(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _step_autocast(dtype):
    def step(model, opt, x, y, scaler=None):
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return step


def _step_chunks(model, opt, x, y):
    for xc, yc in zip(x.chunk(4), y.chunk(4), strict=True):
        F.cross_entropy(model(xc), yc).backward()
    opt.step()
    opt.zero_grad()


def _step_two_views(model, opt, x, y):
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x.flip(3)), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def _step_retain_graph(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    (loss * 0.5).backward()
    opt.step()
    opt.zero_grad()


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _EncoderDecoder(nn.Module):
    """A small UNet: per-pixel logits for a segmentation loss."""

    def __init__(self, classes=4):
        super().__init__()
        self.e1, self.e2, self.e3 = _block(3, 16), _block(16, 32), _block(32, 64)
        self.up2, self.d2 = nn.ConvTranspose2d(64, 32, 2, stride=2), _block(64, 32)
        self.up1, self.d1 = nn.ConvTranspose2d(32, 16, 2, stride=2), _block(32, 16)
        self.out = nn.Conv2d(16, classes, 1)

    def forward(self, x):  # (N, 3, H, W) -> (N, classes, H, W)
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        c = self.e3(F.max_pool2d(b, 2))
        d = self.d2(torch.cat([self.up2(c), b], 1))
        return self.out(self.d1(torch.cat([self.up1(d), a], 1)))


def _encoder_decoder():
    torch.manual_seed(0)
    return _EncoderDecoder()


class _CifarVGG11BN(nn.Module):
    """VGG-11-BN as trained on 32x32 images: torchvision's features, one linear layer."""

    def __init__(self):
        super().__init__()
        self.features = _make_features(
            [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], batch_norm=True)
        self.classifier = nn.Linear(512, 10)

    def forward(self, x):  # (N, 3, 32, 32)
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg11_bn():
    torch.manual_seed(0)
    return _CifarVGG11BN()


def _train(model, opt, data, step, session=None, scaler=None):
    """Train; each step's peak as the session's meter measured it (if any)."""
    peaks = []
    with session or contextlib.nullcontext() as s:
        for x, y in data:
            if s is not None:
                s.meter.reset_peak()
            if scaler is None:
                step(model, opt, x, y)
            else:
                step(model, opt, x, y, scaler)
            if s is not None:
                peaks.append(s.meter.peak)
    return peaks


def _plain_peak(build, make_opt, data_fn, step, scaler=None):
    with EmulatedMeter(torch.device("cpu")) as meter:
        model = build()
        opt = make_opt(model)
        data = data_fn()
        _train(model, opt, data, step, scaler=scaler() if scaler else None)
    return meter.peak, model


def _check(build, step, fraction, make_opt=_sgd, data_fn=_data, session_opt=True,
           scaler=None, plain=None, **config):
    """Train under a session at ``fraction`` of plain's peak (``plain``: the peak and the
    model plain PyTorch trained, if known) and compare."""
    peak, plain = plain or _plain_peak(build, make_opt, data_fn, step, scaler)
    budget = int(peak * fraction)
    model = build()
    opt = make_opt(model)
    session = vmem.session(model, optimizer=opt if session_opt else None, budget=budget,
                           **config)
    peaks = _train(model, opt, data_fn(), step, session, scaler() if scaler else None)
    assert peaks and max(peaks) <= budget, (peaks, budget)
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    return session


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype, fraction):
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0**8)) \
        if dtype == torch.float16 else None
    s = _check(_resnet20, _step_autocast(dtype), fraction, scaler=scaler)
    assert any(d.key.dtype == str(dtype).removeprefix("torch.") for d in s.plan.saves)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("make_opt", [_sgd, _adam])
def test_plain_loop(make_opt, fraction):
    _check(_resnet20, _step_plain, fraction, make_opt)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_accumulation_over_chunks(fraction):
    _check(_resnet20, _step_chunks, fraction)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_optimizer_not_given_to_the_session(fraction):
    s = _check(_resnet20, _step_plain, fraction, _adam, session_opt=False)
    assert s.plan.start_bytes >= 2 * sum(p.numel() * 4 for p in s.model.parameters())


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_dataset_on_the_device(fraction):
    _check(_resnet20, _step_plain, fraction, data_fn=_device_dataset)


def _at_budget_or_minimum(run, peak: int, fraction: float):
    """``run(budget)`` at ``fraction`` of ``peak``; where vmem refuses before any parameter
    changes, again at the minimum it names (below ``peak``)."""
    budget = int(peak * fraction)
    for _ in range(3):
        try:
            return run(budget)
        except vmem.BudgetTooSmall as error:
            assert budget < error.minimum < peak, (budget, error)
            budget = error.minimum + 1
    raise AssertionError(f"refused three times, last at {budget} bytes")


MODELS = [(_resnet20, 0.75, {}), (_resnet20, 0.5, {}), (_vgg11_bn, 0.75, {"split": 1})]


@pytest.mark.parametrize(("build", "fraction", "config"), MODELS)
def test_a_session_object_entered_twice(build, fraction, config):
    peak, plain = _plain_peak(build, _sgd, lambda: _data(steps=2), _step_plain)
    data = list(_data(steps=2))

    def run(budget):
        model = build()
        opt = _sgd(model)
        session = vmem.session(model, optimizer=opt, budget=budget, **config)
        peaks = _train(model, opt, data[:1], _step_plain, session)
        peaks += _train(model, opt, data[1:], _step_plain, session)
        assert max(peaks) <= budget
        return model

    model = _at_budget_or_minimum(run, peak, fraction)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  model.state_dict().values(), strict=True))


class _Padded(nn.Conv2d):
    """A convolution that holds its padding as a child module (efficientnet-pytorch's
    ``Conv2dStaticSamePadding``): not a leaf module, still a convolution."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=0, bias=False)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


def _five_convs(conv):
    layers = [conv(3, 16)]
    for _ in range(4):
        layers += [nn.BatchNorm2d(16), nn.ReLU(), conv(16, 16)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_a_conv_subclass_with_a_child_is_a_segment_like_conv2d():
    def plain_conv(cin, cout):  # the same operators, as two leaf modules
        return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(cin, cout, 3, padding=0, bias=False))

    minimums, segments = [], []
    for conv in (_Padded, plain_conv):
        model = _five_convs(conv)
        with pytest.raises(vmem.BudgetTooSmall) as info:
            with vmem.session(model, budget=1, policy="vdnn_all", split=1,
                              sample=torch.randn(16, 3, 32, 32)):
                pass
        minimums.append(info.value.minimum)
        with vmem.session(model, budget=info.value.minimum, policy="vdnn_all", split=1,
                          sample=torch.randn(16, 3, 32, 32)) as s:
            segments.append(len(s.plan.segments))
    assert segments == [5, 5]
    assert abs(minimums[0] - minimums[1]) <= 0.02 * minimums[1], minimums


def test_the_safety_net_holds_a_plan_made_for_fp32_while_the_step_runs_bf16():
    step = _step_autocast(torch.bfloat16)
    peak, plain = _plain_peak(_resnet20, _sgd, _data, step)
    budget = int(peak * 0.75)
    model = _resnet20()
    opt = _sgd(model)
    # Planned from an fp32 sample: every save of the bf16 step differs from the plan.
    session = vmem.session(model, optimizer=opt, budget=budget,
                           sample=torch.randn(BATCH, 3, 32, 32))
    peaks = _train(model, opt, _data(), step, session)
    assert max(peaks) <= budget
    counters = session.executor.counters
    assert counters.unplanned_saves > 0 and counters.forced_offloads > 0
    assert "safety net: " in session.report()
    # Step 1's trace showed the plan wrong; step 2 ran under a plan of the bf16 step.
    first, second = session.traces
    assert first["unplanned_saves"] == first["saves"] > 0
    assert second["plan"].startswith("planned again") and second["unplanned_saves"] == 0
    assert max(first["measured_peak"], second["measured_peak"]) <= budget
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  model.state_dict().values(), strict=True))


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_two_forwards_before_one_backward(fraction):
    s = _check(_resnet20, _step_two_views, fraction)
    assert s.plan.forwards == 2  # planned again for the step as it ran


def test_a_second_backward_through_a_retained_graph_is_exact():
    """``retain_graph=True``: every save is read twice (offloaded ones fetched again). The
    plan does not model a second backward, so the budget here is plain's peak."""
    s = _check(_resnet20, _step_retain_graph, 1.0, policy="vdnn_all")
    assert s.executor.prefetched_bytes > s.executor.offloaded_bytes > 0


def _step_dice_and_cross_entropy(model, opt, x, y):
    """A segmentation loss whose saves (softmax, one-hot products) the profile never sees."""
    out = model(x)
    prob = out.softmax(1)
    onehot = F.one_hot(y, out.shape[1]).permute(0, 3, 1, 2).float()
    dice = 1 - (2 * (prob * onehot).sum((2, 3)) + 1) / \
        (prob.square().sum((2, 3)) + onehot.sum((2, 3)) + 1)
    (F.cross_entropy(out, y) + dice.mean()).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("make_opt", [_sgd, _adam])
def test_the_first_step_is_traced_and_the_plan_corrected_from_it(make_opt):
    """(With Adam, step 1 runs before the state the plan counts exists: the trace compares
    as if it had.)"""
    s = _check(_encoder_decoder, _step_dice_and_cross_entropy, 0.5, make_opt,
               data_fn=lambda: _data(steps=3, labels=(4, 32, 32)))
    first, *replanned = s.traces
    assert first["step"] == 1 and first["plan"] == "first plan"
    assert first["measured_peak"] > first["predicted_peak"] and first["excess_bytes"] > 0
    assert replanned and all("beyond the plan" in t["plan"] for t in replanned)
    last = replanned[-1]  # its plan's forecast covers the step, to within the re-plan slack
    assert last["measured_peak"] <= last["predicted_peak"] + s.budget // 100
    report = s.report()
    assert "step 1 (first plan): predicted peak" in report and "beyond the plan" in report


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_segmentation_loss_on_an_encoder_decoder(fraction):
    _check(_encoder_decoder, _step_plain, fraction,
           data_fn=lambda: _data(labels=(4, 32, 32)))


@pytest.mark.parametrize(("build", "fraction", "config"), MODELS)
def test_two_sessions_at_once(build, fraction, config):
    def both():
        first, second = build(), build()
        return first, second, _sgd(first), _sgd(second)

    with EmulatedMeter(torch.device("cpu")) as meter:
        a, b, opt_a, opt_b = both()
        for x, y in _data():
            _step_plain(a, opt_a, x, y)
            _step_plain(b, opt_b, x, y)

    def run(budget):
        a2, b2, opt_a2, opt_b2 = both()
        peaks = []
        with vmem.session(a2, optimizer=opt_a2, budget=budget, **config) as sa, \
                vmem.session(b2, optimizer=opt_b2, budget=budget, **config) as sb:
            for x, y in _data():
                sa.meter.reset_peak()
                sb.meter.reset_peak()
                _step_plain(a2, opt_a2, x, y)
                _step_plain(b2, opt_b2, x, y)
                peaks += [sa.meter.peak, sb.meter.peak]
        assert max(peaks) <= budget
        return a2, b2

    a2, b2 = _at_budget_or_minimum(run, meter.peak, fraction)
    for plain, got in ((a, a2), (b, b2)):
        assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(),
                                                      got.state_dict().values(), strict=True))


def _check_or_minimum(build, step, fraction, make_opt=_sgd, data_fn=_data, **config):
    """:func:`_check`, or, where vmem refuses before any parameter changes, the check at the
    minimum it names (below plain's peak). An accumulation loop may be refused twice: at
    its first forward, planned without gradients held, then at the next one, with."""
    plain = _plain_peak(build, make_opt, data_fn, step, config.get("scaler"))
    return _at_budget_or_minimum(
        lambda budget: _check(build, step, (budget + 0.5) / plain[0], make_opt, data_fn,
                              plain=plain, **config), plain[0], fraction)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("make_opt", [_sgd, _adam])
def test_vgg11_bn(make_opt, fraction):
    """VGG-11-BN at 32x32, batch 64: its parameters, gradients and optimizer state (110 MB
    with SGD's momentum, of plain's 193 MiB) and the working set of its widest layers
    bound any plan, so vmem may refuse before the first step; the minimum it names must
    then train. (Offloading and recomputation only: splitting fits 0.75 with SGD, but its
    BatchNorm over parts is exact only to fp32 rounding, and these checks are bit for bit.)
    """
    _check_or_minimum(_vgg11_bn, _step_plain, fraction, make_opt, split=1)


def _device_dataset():
    """Batches sliced from one tensor the loop holds on the device."""
    whole = next(_data(steps=1, batch=BATCH * STEPS))
    return [(whole[0][i * BATCH:(i + 1) * BATCH], whole[1][i * BATCH:(i + 1) * BATCH])
            for i in range(STEPS)]


def _small_batches():
    return _data(batch=BATCH // 4)


_LOOPS = {  # (autocast at a quarter of the batch: bf16 and fp16 convolutions are slow on CPUs)
    "bf16 autocast": dict(step=_step_autocast(torch.bfloat16), data_fn=_small_batches),
    "fp16 autocast and GradScaler": dict(
        step=_step_autocast(torch.float16), data_fn=_small_batches,
        scaler=lambda: torch.amp.GradScaler("cpu", init_scale=2.0**8)),
    "two forwards": dict(step=_step_two_views),
    "accumulation over chunks": dict(step=_step_chunks),
    "dataset on the device": dict(step=_step_plain, data_fn=_device_dataset),
    "Adam not given to the session": dict(step=_step_plain, make_opt=_adam,
                                          session_opt=False),
}


@pytest.mark.parametrize("loop", list(_LOOPS))
def test_vgg11_bn_loops(loop):
    """The loops ResNet-20 is checked under, on VGG-11-BN at 0.75 of plain's peak."""
    _check_or_minimum(_vgg11_bn, fraction=0.75, split=1, **_LOOPS[loop])


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _block(3, 16), _block(16, 16)
        self.fc = nn.Linear(16, 10)

    def head(self, h):
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class _Checkpointed(_Small):
    def forward(self, x):
        return self.head(checkpoint(self.b, self.a(x), use_reentrant=False))


class _Masked(_Small):
    def forward(self, x):
        h = self.b(self.a(x))
        return self.head(h * (h > 0.5)) + h[h > 1.0].sum() * 1e-3  # data-dependent shape


class _Frozen(_Small):
    """A frozen trunk run with gradients on; only the head trains."""

    def __init__(self):
        super().__init__()
        for p in [*self.a.parameters(), *self.b.parameters()]:
            p.requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.head(self.b(h))


def _logging_hook():
    model = _small(_Small)
    model.means = []
    model.a.register_forward_hook(lambda m, i, out: model.means.append(out.mean().item()))
    model.forward = lambda x: model.head(model.b(model.a(x)))
    return model


def _small(cls):
    torch.manual_seed(0)
    return cls()


@pytest.mark.parametrize("build", [lambda: _small(_Checkpointed), lambda: _small(_Masked),
                                   lambda: _small(_Frozen), _logging_hook],
                         ids=["checkpoint", "boolean-mask", "frozen", "item-in-a-hook"])
def test_models_that_do_more_than_compute(build, caplog):
    """Bit-identical to plain under a budget below plain's peak: 0.9x, or the minimum vmem
    names there (offloading alone: splitting would round differently)."""
    data = lambda: _data(batch=32)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="vmem"):
        try:
            _check(build, _step_plain, 0.9, data_fn=data, split=1)
        except vmem.BudgetTooSmall as error:
            peak, _ = _plain_peak(build, _sgd, data, _step_plain)
            _check(build, _step_plain, (error.minimum + 1) / peak, data_fn=data, split=1)
    cannot = [r for r in caplog.records if "cannot run shape-only" in r.getMessage()]
    assert len(cannot) == (type(build()) in (_Masked,) or hasattr(build(), "means"))
