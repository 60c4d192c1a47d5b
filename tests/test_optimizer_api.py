"""The torch.optim.Optimizer contract: state_dict round trip, LR schedulers, closures, zero_grad,
and one batched transform per matrix shape."""

import copy

import pytest
import torch

from conftest import TinyGPT, lm_loss
from reg_dist import REG, Muon, MuonEq

TOKENS = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))


def _train(model, opt, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, TOKENS).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_state_dict_round_trip_continues_exactly(cls):
    torch.manual_seed(0)
    a = TinyGPT()
    opt_a = cls(a, lr=0.01)
    _train(a, opt_a, 3)
    b = copy.deepcopy(a)
    opt_b = cls(b, lr=0.5)  # the loaded state, not this lr, must win
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["lr"] == 0.01
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_carries_the_skip_counter():
    w = torch.zeros(3, 3, requires_grad=True)
    opt = REG([w])
    w.grad = torch.full((3, 3), float("nan"))
    opt.step()
    other = REG([torch.zeros(3, 3, requires_grad=True)])
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_lr_scheduler_drives_every_group(cls, tiny_gpt):
    opt = cls(tiny_gpt, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    _train(tiny_gpt, opt, 3, sched)
    assert [g["lr"] for g in opt.param_groups] == [0.1 * 0.5**3] * len(opt.param_groups)


def test_zero_lr_from_scheduler_leaves_matrices_unchanged(tiny_gpt):
    opt = REG(tiny_gpt, lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = copy.deepcopy(tiny_gpt.state_dict())
    _train(tiny_gpt, opt, 1)
    for name, value in tiny_gpt.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_closure_is_evaluated_with_grad_and_its_loss_returned(cls, tiny_gpt):
    opt = cls(tiny_gpt)

    def closure():
        opt.zero_grad()
        loss = lm_loss(tiny_gpt, TOKENS)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert all(opt.state[p] for p in tiny_gpt.parameters())


def test_zero_grad_clears_gradients(tiny_gpt):
    opt = Muon(tiny_gpt)
    lm_loss(tiny_gpt, TOKENS).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in tiny_gpt.parameters())


def test_parameters_without_grad_are_left_alone():
    w, v = torch.ones(3, 3, requires_grad=True), torch.ones(3, 3, requires_grad=True)
    opt = REG([w, v])
    w.grad = torch.randn(3, 3)
    opt.step()
    assert torch.equal(v, torch.ones(3, 3)) and not opt.state[v]


def _count_newton_schulz_calls(monkeypatch) -> list:
    """The stack shapes every Newton–Schulz call of the spectral stage sees."""
    import reg_dist.optim.algorithms.muon as muon

    calls = []
    original = muon.orthogonalize

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return original(x, *args)

    monkeypatch.setattr(muon, "orthogonalize", counting)
    return calls


@pytest.mark.parametrize("cls", [Muon, MuonEq])
def test_on_the_cpu_every_matrix_is_transformed_on_its_own_view_not_copied_into_a_stack(cls, monkeypatch):
    # (off the CPU the same-shape matrices go through one batched call: comm.owner.LocalPlan)
    calls = _count_newton_schulz_calls(monkeypatch)
    params = [torch.zeros(8, 6, requires_grad=True) for _ in range(3)]
    params += [torch.zeros(2, 8, 6, requires_grad=True), torch.zeros(5, 5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn(p.shape)
    cls(params).step()
    assert sorted(calls) == [(1, 5, 5)] + [(1, 8, 6)] * 5


@pytest.mark.parametrize("cls", [REG, Muon, MuonEq])
def test_batched_step_equals_one_optimizer_per_matrix(cls):
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 8, 6, generator=g)
    grads = [torch.randn(3, 8, 6, generator=g) for _ in range(3)]
    kwargs = {} if cls is REG else {"ns_dtype": torch.float32}
    together = [stack.clone().requires_grad_(), stack[0].clone().requires_grad_()]
    opt = cls(together, **kwargs)
    alone = [stack[i].clone().requires_grad_() for i in range(3)]
    opts = [cls([p], **kwargs) for p in alone]
    for G in grads:
        together[0].grad, together[1].grad = G.clone(), G[0].clone()
        opt.step()
        for p, o, Gi in zip(alone, opts, G):
            p.grad = Gi.clone()
            o.step()
    for i in range(3):
        torch.testing.assert_close(together[0][i], alone[i], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-6, atol=1e-7)


def test_stacks_are_bounded_by_stack_bytes(monkeypatch):
    import reg_dist.comm.owner as owner

    calls = _count_newton_schulz_calls(monkeypatch)
    monkeypatch.setattr(owner, "UNSTACKED_DEVICES", ())  # stack on the CPU too, as on an accelerator
    monkeypatch.setattr(owner, "STACK_BYTES", 2 * 8 * 6 * 4)  # two fp32 8×6 matrices
    params = [torch.zeros(8, 6, requires_grad=True) for _ in range(5)] + [torch.zeros(3, 8, 6, requires_grad=True)]
    for p in params:
        p.grad = torch.randn(p.shape)
    Muon(params, ns_dtype=torch.float32).step()
    assert calls == [(2, 8, 6), (2, 8, 6), (1, 8, 6), (3, 8, 6)]  # a stacked (3, 8, 6) parameter is never cut


def test_stack_size_or_no_stack_does_not_change_the_result(monkeypatch):
    import reg_dist.comm.owner as base

    g = torch.Generator().manual_seed(0)
    w0 = [torch.randn(8, 6, generator=g) for _ in range(4)]
    grads = [torch.randn(8, 6, generator=g) for _ in range(4)]
    results = []
    for unstacked, budget in ((base.UNSTACKED_DEVICES, base.STACK_BYTES), ((), base.STACK_BYTES), ((), 8 * 6 * 4)):
        monkeypatch.setattr(base, "UNSTACKED_DEVICES", unstacked)
        monkeypatch.setattr(base, "STACK_BYTES", budget)
        params = [w.clone().requires_grad_() for w in w0]
        for p, G in zip(params, grads):
            p.grad = G.clone()
        Muon(params, ns_dtype=torch.float32).step()
        results.append(torch.stack([p.detach() for p in params]))
    for other in results[1:]:
        torch.testing.assert_close(results[0], other, rtol=1e-6, atol=1e-7)
