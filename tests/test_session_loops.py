"""Training loops as users write them, beyond the textbook step (from a review of the runtime)."""

import pytest
import torch
from nets import SHAPE, build
from torch import nn

import vmem
from vmem import BudgetTooSmall


def _minimum(model, policy="vdnn_all", **sample):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(BudgetTooSmall) as info:
        with vmem.session(model, optimizer=opt, budget=1, policy=policy,
                          sample=torch.randn(SHAPE)):
            pass
    return info.value.minimum, opt


def test_output_held_through_backward_stays_within_the_minimum_budget():
    model = build("resnet")
    budget, opt = _minimum(model)
    with vmem.session(model, optimizer=opt, budget=budget, policy="vdnn_all") as s:
        for _ in range(2):
            out = model(torch.randn(SHAPE))  # held until the end of the step
            out.sum().backward()
            opt.step()
            opt.zero_grad()
            del out
    assert s.peak <= budget and s.executor.offloaded_bytes > 0


def test_gradient_accumulation_replans_with_gradients_held():
    model = build("resnet")
    budget, opt = _minimum(model)
    budget = int(budget * 1.2)
    with vmem.session(model, optimizer=opt, budget=budget, policy="auto") as s:
        plans = set()
        for _ in range(2):
            for _ in range(2):  # two micro-batches per step: gradients exist in the second
                model(torch.randn(SHAPE)).sum().backward()
                plans.add(id(s.plan))
            opt.step()
            opt.zero_grad()
    assert s.peak <= budget
    assert len(plans) == 2  # one plan without gradients held, one with


def test_a_storage_changed_in_place_between_two_saves_is_copied_again():
    class Logged(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.act = nn.ELU(inplace=True)
            self.fc = nn.Linear(16 * 32 * 32, 10)

        def forward(self, x):
            h = self.conv(x)
            self.stat = h.abs().mean()  # saves h; never backpropagated
            h = self.act(h)  # changes h in place, then saves it again
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    plain, offloaded = Logged(), Logged()
    offloaded.load_state_dict(plain.state_dict())
    x = torch.randn(SHAPE)
    plain(x).sum().backward()
    with vmem.session(offloaded, policy="vdnn_all") as s:
        offloaded(x).sum().backward()
    assert s.executor.offloaded_bytes > 0
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_a_saved_tensor_changed_in_place_raises_like_autograd():
    lin = nn.Linear(64, 64)
    x = torch.randn(128, 64)
    with vmem.session(lin, policy="vdnn_all"):
        h = lin(x)
        y = (h * h).sum()  # saves h (32 KiB)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("policy", ["none", "vdnn_all"])
def test_a_save_the_plan_keeps_changed_in_place_raises_like_autograd(policy):
    """Under saved-tensor hooks autograd checks no versions itself: the executor does, for
    kept saves as for offloaded ones."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh())  # tanh saves its output: 32 KiB
    x = torch.randn(128, 64)
    with vmem.session(model, budget=2**30, policy=policy):
        out = model(x)
        out.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_batches_sliced_from_a_device_dataset_still_follow_the_plan():
    dataset = torch.randn(4 * SHAPE[0], *SHAPE[1:])
    model = build("resnet")
    with vmem.session(model, policy="vdnn_all") as s:
        for i in range(2):
            model(dataset[i * SHAPE[0]:(i + 1) * SHAPE[0]]).sum().backward()
    assert s.executor.offloaded_bytes == 2 * s.plan.offloaded_bytes > 0


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.conv = nn.Conv1d(64, 64, 3, padding=1)

    def forward(self, tokens, scale=None):  # tokens: (N, L) integers
        h = self.embed(tokens).transpose(1, 2)  # (N, 64, L)
        h = torch.relu(self.conv(h))
        return h * scale if scale is not None else h


@pytest.mark.parametrize("call", ["positional", "keyword", "two inputs"])
def test_integer_keyword_and_multiple_inputs(call):
    torch.manual_seed(0)
    plain, offloaded = TwoInputs(), TwoInputs()
    offloaded.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 100, (16, 256))
    scale = torch.rand(16, 64, 256)
    run = {"positional": lambda m: m(tokens), "keyword": lambda m: m(tokens=tokens),
           "two inputs": lambda m: m(tokens, scale)}[call]
    run(plain).sum().backward()
    with vmem.session(offloaded, policy="vdnn_all") as s:
        run(offloaded).sum().backward()
    assert s.plan is not None and s.executor.offloaded_bytes > 0
    for p, q in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_host_slices_go_back_even_when_the_loop_keeps_a_saved_output():
    model = nn.Sequential(build("vgg_bn"), nn.Sigmoid())  # Sigmoid saves its output
    kept = []
    with vmem.session(model, policy="vdnn_all") as s:
        for _ in range(4):
            out = model(torch.randn(SHAPE))
            out.sum().backward()
            kept.append(out.detach())
        stats = s.pools.host.stats
        assert stats.in_use == 0 and stats.overflow_allocations == 0


def test_an_interrupted_forward_leaves_no_saved_tensor_hooks_behind():
    model = build("resnet")

    class Stop(BaseException):
        pass

    def interrupt(module, args):
        raise Stop

    with vmem.session(model, policy="vdnn_all"):
        model(torch.randn(SHAPE)).sum().backward()
        handle = model.layer1.register_forward_pre_hook(interrupt)
        with pytest.raises(Stop):
            model(torch.randn(SHAPE))
        handle.remove()
        model(torch.randn(SHAPE)).sum().backward()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_complex_saves_keep_their_conjugate_bit():
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64, dtype=torch.complex64))

        def forward(self, a):
            b = a @ self.w  # (64, 64) complex: 32 KiB
            return (b.conj() * b.sin()).real.sum()

    torch.manual_seed(0)
    plain, offloaded = Complex(), Complex()
    offloaded.load_state_dict(plain.state_dict())
    a = torch.randn(64, 64, dtype=torch.complex64)
    plain(a).backward()
    with vmem.session(offloaded, policy="vdnn_all"):
        offloaded(a).backward()
    assert torch.equal(plain.w.grad, offloaded.w.grad)


def test_reading_saved_tensors_twice_fetches_once():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            (again,) = ctx.saved_tensors
            return grad * 2 + 0 * (x - again)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            return Twice.apply(torch.tanh(self.lin(x)))

    net = Net()
    with vmem.session(net, policy="vdnn_all") as s:
        net(torch.randn(128, 64)).sum().backward()
    assert s.executor.prefetched_bytes == s.executor.offloaded_bytes > 0
