"""Hugging Face ``Conv1D`` (GPT-2) stores its weight in × out, the transpose of ``nn.Linear``: a
matrix algorithm must see it as out × in, so that it steps exactly like the equivalent Linear."""

import pytest
import torch
from torch import nn

from reg_dist import REG, Muon, MuonEq
from reg_dist.optim.routing import as_matrix, parse_params

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402  (a test-only dependency)

HINT = "last layer: if it is the output head, use algorithm='adamw'"


def _pair():
    """A Conv1D layer then a Linear head, and the same function with a Linear first layer."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(24, 8), nn.Linear(24, 3))  # Conv1D(nf=out, nx=in): weight (8, 24)
    lin = nn.Sequential(nn.Linear(8, 24), nn.Linear(24, 3))
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.T)
        lin[0].bias.copy_(conv[0].bias)
        lin[1].load_state_dict(conv[1].state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(conv(x), lin(x))
    return conv, lin


@pytest.mark.parametrize("cls,kwargs", [(Muon, dict(scale="original")), (MuonEq, dict(mode="row")), (REG, {})],
                         ids=["Muon-original", "MuonEq-row", "REG"])
def test_conv1d_steps_exactly_like_the_equivalent_linear(cls, kwargs):
    conv, lin = _pair()
    opt_conv, opt_lin = cls(conv, lr=0.05, **kwargs), cls(lin, lr=0.05, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p_lin, p_conv in zip(lin.parameters(), conv.parameters()):
            grad = torch.randn(p_lin.shape, generator=g)
            p_lin.grad = grad.clone()
            p_conv.grad = grad.T.clone() if p_conv.ndim == 2 and p_conv.shape != p_lin.shape else grad.clone()
        opt_conv.step()
        opt_lin.step()
    assert torch.equal(conv[0].weight.T, lin[0].weight)
    assert torch.equal(conv[0].bias, lin[0].bias) and torch.equal(conv[1].weight, lin[1].weight)
    assert [(r.matrix, r.reason) for r in opt_conv.routes if r.matrix] == [
        ((1, 24, 8), "matrix (Conv1D, transposed)"),
        ((1, 3, 24), f"matrix ({HINT})"),
    ]
    assert [r.matrix for r in opt_lin.routes if r.matrix] == [(1, 24, 8), (1, 3, 24)]


def test_as_matrix_views_a_conv1d_weight_as_out_by_in():
    conv, lin = _pair()
    _, infos = parse_params(conv)
    info = infos[id(conv[0].weight)]
    assert info.transposed and not infos[id(conv[1].weight)].transposed
    view = as_matrix(conv[0].weight, info)
    assert view.shape == (1, 24, 8) and torch.equal(view[0], lin[0].weight)
    assert view.data_ptr() == conv[0].weight.data_ptr()  # a view, not a copy


def test_gpt2_routing_table_shows_its_conv1d_layers_transposed():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    routes = {r.name: (r.algorithm, r.matrix, r.reason) for r in MuonEq(transformers.GPT2LMHeadModel(config)).routes}
    assert routes["transformer.wte.weight = lm_head.weight"] == ("adamw", None, "embedding (tied)")
    assert routes["transformer.h.0.attn.c_attn.weight"] == ("muoneq", (1, 48, 16), "matrix (Conv1D, transposed)")
    assert routes["transformer.h.0.mlp.c_proj.weight"] == ("muoneq", (1, 16, 64), "matrix (Conv1D, transposed)")


@pytest.mark.parametrize("cls,kwargs", [(MuonEq, dict(mode="row")), (REG, {})], ids=["MuonEq-row", "REG"])
def test_fsdp2_sharded_conv1d_equals_one_process(cls, kwargs):
    """A Conv1D weight under FSDP2 (rows of its in × out storage split over 2 ranks) is the same
    out × in matrix as in one process: its layout is the transposed block."""
    from multiproc import run_ranks

    kwargs = {"lr": 0.05, "ns_dtype": torch.float32, **kwargs} if cls is not REG else {"lr": 0.05}
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in _pair()[0].parameters()] for _ in range(3)]
    conv, _ = _pair()
    opt = cls(conv, **kwargs)
    for step in grads:
        for p, grad in zip(conv.parameters(), step):
            p.grad = grad.clone()
        opt.step()
    expected = conv[0].weight.detach().clone()

    def body(rank, world):
        from torch.distributed.fsdp import fully_shard

        model, _ = _pair()
        fully_shard(model)
        opt = cls(model, **kwargs)
        for step in grads:
            for p, grad in zip(model.parameters(), step):
                p.grad = torch.distributed.tensor.distribute_tensor(grad, p.device_mesh, p.placements)
            opt.step()
        return model[0].weight.full_tensor().detach().numpy().copy()  # tensors do not survive the rank exit

    for got in run_ranks(2, body):
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-6)
