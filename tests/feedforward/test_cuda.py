"""On a real GPU: exactness with copy streams, and a race test that delays the streams."""

import pytest
import torch
from nets import NETS, SHAPE, build
from torch import nn

import vmem
from vmem.control import make_plan
from vmem.feedforward import HostPool, OffloadExecutor, StagingPool
from vmem.preprocessing import profile_network
from vmem.preprocessing.keys import ModuleScope
from vmem.transfer import backends, make_backend

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def deterministic_kernels():
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _train(name, steps=3, sleep=0, slow_prefetch=0, **session):
    model = build(name).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator(device="cuda").manual_seed(1)
    handles = []
    if sleep:  # delay the compute stream before every layer: a missing wait reads stale bytes
        handles = [m.register_forward_pre_hook(lambda *_: torch.cuda._sleep(sleep))
                   for m in model.modules() if next(m.children(), None) is None]
    grads = []
    with vmem.session(model, optimizer=opt, **session) as s:
        if slow_prefetch and s.active:
            _slow_down_prefetch(s, slow_prefetch)
        for _ in range(steps):
            x = torch.randn(SHAPE, device="cuda", generator=data)
            y = torch.randint(0, 10, (SHAPE[0],), device="cuda", generator=data)
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
    for handle in handles:
        handle.remove()
    torch.cuda.synchronize()
    return s, grads, model


def _slow_down_prefetch(s, cycles):
    """Queue a sleep on the prefetch stream before every batch of copies back."""
    backend = s.backend
    prefetch_many = backend.prefetch_many

    def slow(items):
        with torch.cuda.stream(backend.prefetch_stream):
            torch.cuda._sleep(cycles)
        return prefetch_many(items)

    backend.prefetch_many = slow


@pytest.mark.parametrize("policy", ["vdnn_all", "vdnn_conv", "recompute", "auto"])
@pytest.mark.parametrize("name", list(NETS))
def test_bit_identical_on_cuda(name, policy):
    _, plain, _ = _train(name)
    s, got, _ = _train(name, policy=policy)
    assert s.executor.offloaded_bytes > 0 or policy == "auto"
    for want, have in zip(plain, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want, have, strict=True))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_race_delayed_streams_twenty_times(backend):
    if backend not in backends():
        pytest.skip(f"{backend} backend unavailable here")
    _, plain, _ = _train("resnet")
    for _ in range(20):
        s, got, _ = _train("resnet", sleep=200_000, slow_prefetch=2_000_000, policy="vdnn_all",
                           backend=backend)
        assert s.executor.prefetched_bytes > 0 and s.backend.name == backend
        for want, have in zip(plain, got, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(want, have, strict=True))


def test_peak_within_budget_and_fraction_restored():
    before = torch.cuda.get_per_process_memory_fraction(0) \
        if hasattr(torch.cuda, "get_per_process_memory_fraction") else None
    model = vmem.models.resnet18(num_classes=10).cuda()
    x = torch.randn(64, 3, 128, 128, device="cuda")
    budget = 2 * 2**30
    with vmem.session(model, budget=budget, policy="vdnn_all", sample=x) as s:
        model(x).sum().backward()
    assert s.peak <= budget
    if before is not None:
        assert torch.cuda.get_per_process_memory_fraction(0) == before


def test_split_vgg16_shape_within_a_budget_offloading_cannot_meet_on_cuda():
    """Split runs with their inputs streamed over the copy streams: within the budget, and
    equal to plain (float64, as in tests/test_session_split.py)."""
    def train(**session):
        torch.manual_seed(0)
        model = build("vgg16").double().cuda()
        x = torch.randn(8, 3, 128, 128, device="cuda", dtype=torch.float64)
        with vmem.session(model, **session) as s:
            model(x).sum().backward()
        torch.cuda.synchronize()
        return s, [p.grad for p in model.parameters()]

    x = torch.empty(8, 3, 128, 128, device="cuda", dtype=torch.float64)
    with pytest.raises(vmem.BudgetTooSmall) as info:  # offloading alone
        with vmem.session(build("vgg16").double().cuda(), budget=2**20, split=1, sample=x):
            pass
    budget = int(info.value.minimum * 0.9)
    _, plain = train()
    s, got = train(budget=budget)
    assert s.plan.splits and s.peak <= budget
    assert s.pools.host.stats.peak_in_use > 0  # the split runs' inputs went to the host
    for a, b in zip(got, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_compressed_offloads_under_delayed_streams():
    """The native backend's compress-to-host and decompress kernels inside the executor, the
    compute stream delayed before every layer: gradients equal plain PyTorch's."""
    if "native" not in backends():
        pytest.skip("native backend unavailable here")
    x = torch.randn(SHAPE, device="cuda")
    plain = build("resnet").cuda()
    plain(x).sum().backward()
    model = build("resnet").cuda()
    profile = profile_network(model, SHAPE)
    for save in profile.timeline.saves:
        save.density = 0.3  # compress every offload
    plan = make_plan(profile, budget=None, policy="vdnn_all", compress=True)
    backend = make_backend("native", torch.device("cuda"))
    keys = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), x]}
    executor = OffloadExecutor(plan, torch.device("cuda"), backend, HostPool(backend.host_buffer),
                               StagingPool(), keys, ModuleScope(model))
    handles = [m.register_forward_pre_hook(lambda *_: torch.cuda._sleep(200_000))
               for m in model.modules() if next(m.children(), None) is None]
    executor.start_forward(keys)
    with executor.hooks():
        out = model(x)
    executor.end_forward()
    out.sum().backward()
    for handle in handles:
        handle.remove()
    torch.cuda.synchronize()
    assert executor.counters.compressed_saves == plan.offloaded > 0
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
