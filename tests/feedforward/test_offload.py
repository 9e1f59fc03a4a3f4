"""The executor on its own: what it offloads, what it leaves alone, the pools."""

import torch
from nets import SHAPE, build
from torch import nn

from vmem.control import make_plan
from vmem.feedforward import HostPool, OffloadExecutor, StagingPool
from vmem.preprocessing import profile_network
from vmem.preprocessing.keys import ModuleScope
from vmem.transfer import make_backend


def _executor(model, shape, policy="vdnn_all", plan=None):
    plan = plan or make_plan(profile_network(model, shape), budget=None, policy=policy)
    backend = make_backend("torch", torch.device("cpu"))
    keys = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    return OffloadExecutor(plan, torch.device("cpu"), backend, HostPool(backend.host_buffer),
                           StagingPool(), keys, ModuleScope(model))


def _step(model, executor, x):
    executor.start_forward(executor.resident | {x.untyped_storage()._cdata})
    with executor.hooks():
        out = model(x)
    executor.end_forward()
    out.sum().backward()


def test_a_storage_saved_twice_is_offloaded_once():
    model = build("saved_twice")
    executor = _executor(model, SHAPE)
    x = torch.randn(SHAPE)
    _step(model, executor, x)
    assert executor.offloaded_bytes == executor.plan.offloaded_bytes
    a_bytes = SHAPE[0] * 16 * 32 * 32 * 4  # conv's output, saved twice by the mul
    assert sum(1 for d in executor.plan.saves if d.nbytes == a_bytes) >= 1
    assert executor.host_pool.stats.slices == executor.plan.offloaded


def test_parameters_buffers_and_tiny_tensors_stay():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.Tanh(),
                          nn.Linear(1024, 4))
    executor = _executor(model, (64, 1024))
    x = torch.randn(64, 1024)  # the input: the caller holds it, so it stays too
    resident = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), x]}
    seen = []
    pack = executor.pack
    executor.pack = lambda t: seen.append((t, pack(t))) or seen[-1][1]
    _step(model, executor, x)
    for t, packed in seen:
        key, nbytes = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
        if key in resident or nbytes < executor.plan.min_bytes:
            assert packed is t  # weights (4 MiB) and BatchNorm statistics pass untouched
        else:
            assert not isinstance(packed, torch.Tensor)
    assert any(t.untyped_storage()._cdata in resident for t, _ in seen)
    assert executor.offloaded_bytes == executor.plan.offloaded_bytes > 0


def test_gradients_equal_with_the_executor_alone():
    x = torch.randn(SHAPE)
    plain, offloaded = build("resnet"), build("resnet")
    plain(x).sum().backward()
    executor = _executor(offloaded, SHAPE)
    _step(offloaded, executor, x)
    assert executor.offloaded_bytes > 0
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_host_pool_reuses_its_arena():
    backend = make_backend("torch", torch.device("cpu"))
    pool = HostPool(backend.host_buffer, limit=4096)
    pool.reserve(2048)
    a, give_a = pool.take(1000)
    b, give_b = pool.take(1000)
    assert a.data_ptr() != b.data_ptr() and pool.stats.arena_allocations == 1
    assert pool.take(3000) is None  # over the host budget
    give_a()
    give_b()
    c, give_c = pool.take(1000)
    assert c.data_ptr() == a.data_ptr() and pool.stats.overflow_allocations == 0
    give_c()
    assert pool.stats.in_use == 0 and pool.stats.peak_in_use == 2048


def _with_densities(profile, density):
    for save in profile.timeline.saves:
        save.density = density
    return profile


def test_compressed_offloads_give_identical_gradients_and_round_trip():
    x = torch.randn(SHAPE)
    plain, offloaded = build("resnet"), build("resnet")
    plain(x).sum().backward()
    profile = _with_densities(profile_network(offloaded, SHAPE), 0.3)
    plan = make_plan(profile, budget=None, policy="vdnn_all", compress=True)
    assert 0 < plan.link_bytes < plan.offloaded_bytes
    assert all(d.compress for d in plan.saves if d.action == "offload")
    backend = make_backend("torch", torch.device("cpu"))  # the CPU reference compresses
    keys = {t.untyped_storage()._cdata for t in [*offloaded.parameters(),
                                                 *offloaded.buffers()]}
    executor = OffloadExecutor(plan, torch.device("cpu"), backend,
                               HostPool(backend.host_buffer), StagingPool(), keys,
                               ModuleScope(offloaded))
    _step(offloaded, executor, x)
    assert executor.counters.compressed_saves == plan.offloaded
    assert executor.prefetched_bytes == executor.offloaded_bytes  # all decompressed back
    assert executor.host_pool.stats.overflow_allocations == 0  # host_bytes reserved enough
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_a_plan_read_back_from_json_runs_as_the_original():
    x = torch.randn(SHAPE)
    plain = build("resnet")
    plain(x).sum().backward()
    model = build("resnet")
    plan = _executor(model, SHAPE).plan
    again = type(plan).from_json(plan.to_json())
    assert again == plan and all(d.key is not None for d in again.saves)
    executor = _executor(model, SHAPE, plan=again)
    _step(model, executor, x)
    assert executor.counters.unplanned_saves == 0
    assert executor.offloaded_bytes == again.offloaded_bytes > 0
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
