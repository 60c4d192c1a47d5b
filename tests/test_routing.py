"""Which algorithm each parameter gets, and how a matrix algorithm views it."""

import logging

import pytest
import torch
from torch import nn

from reg_dist import REG, Muon, MuonEq


def _table(opt):
    return [(r.name, r.algorithm, r.reason) for r in opt.routes]


def test_tiny_gpt_routing_table(tiny_gpt):
    opt = REG(tiny_gpt)
    expected = [
        ("wte.weight = lm_head.weight", "adamw", "embedding (tied)"),
        ("wpe.weight", "adamw", "embedding"),
    ]
    for i in range(2):
        b = f"blocks.{i}"
        expected += [
            (f"{b}.ln.weight", "adamw", "1-D"),
            (f"{b}.ln.bias", "adamw", "1-D"),
            (f"{b}.qkv.weight", "reg", "matrix"),
            (f"{b}.qkv.bias", "adamw", "1-D"),
            (f"{b}.proj.weight", "reg", "matrix"),
            (f"{b}.fc.weight", "reg", "matrix"),
            (f"{b}.fc.bias", "adamw", "1-D"),
            (f"{b}.fc2.weight", "reg", "matrix"),
        ]
    expected += [("ln_f.weight", "adamw", "1-D"), ("ln_f.bias", "adamw", "1-D")]
    assert _table(opt) == expected
    # every trainable tensor is in exactly one group, and the table's matrices are real views
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in tiny_gpt.parameters())
    assert {g["algorithm"] for g in opt.param_groups} == {"reg", "adamw"}
    assert opt.routes[4].matrix == (1, 48, 16)


def test_routing_table_is_logged_once_and_readable(tiny_gpt, caplog):
    with caplog.at_level(logging.INFO, logger="reg_dist"):
        opt = Muon(tiny_gpt)
    logged = [r for r in caplog.records if "routing" in r.getMessage()]
    assert len(logged) == 1
    assert opt.routing_table() in logged[0].getMessage()
    assert "blocks.0.fc.weight" in opt.routing_table() and "muon" in opt.routing_table()


def test_head_untied_goes_to_adamw_by_name():
    model = nn.ModuleDict(dict(body=nn.Linear(4, 4), lm_head=nn.Linear(4, 10)))
    routes = {r.name: r.reason for r in MuonEq(model).routes}
    assert routes["lm_head.weight"] == "output head"
    assert routes["body.weight"] == "matrix"


def test_named_parameters_route_embeddings_and_heads_by_name():
    params = [
        ("transformer.wte.weight", torch.zeros(10, 4, requires_grad=True)),
        ("model.embed_tokens.weight", torch.zeros(10, 4, requires_grad=True)),
        ("model.layers.0.attention.output.dense.weight", torch.zeros(4, 4, requires_grad=True)),
        ("output.weight", torch.zeros(10, 4, requires_grad=True)),
    ]
    assert [r.algorithm for r in REG(params).routes] == ["adamw", "adamw", "reg", "adamw"]


def test_plain_tensors_get_index_names():
    opt = REG([torch.zeros(3, 3, requires_grad=True), torch.zeros(3, requires_grad=True)])
    assert [(r.name, r.algorithm) for r in opt.routes] == [("param0", "reg"), ("param1", "adamw")]


def test_group_may_choose_adamw_for_a_matrix():
    w, v = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, 4, requires_grad=True)
    opt = REG([{"params": [w], "algorithm": "adamw", "lr": 3e-4}, {"params": [v]}])
    assert [(r.algorithm, r.reason) for r in opt.routes] == [("adamw", "group says adamw"), ("reg", "matrix")]
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[1]["lr"] == 1e-3


def test_group_may_force_the_matrix_algorithm_on_an_embedding():
    emb = nn.Embedding(10, 4)
    opt = Muon([{"params": emb, "algorithm": "muon"}])
    assert opt.routes[0].algorithm == "muon"


def test_matrix_algorithm_on_a_1d_tensor_is_an_error():
    with pytest.raises(ValueError, match=r"param0 of shape \[5\].*algorithm='reg'"):
        REG([{"params": [torch.zeros(5, requires_grad=True)], "algorithm": "reg"}])


def test_unknown_algorithm_is_an_error_listing_the_allowed_ones():
    with pytest.raises(ValueError, match=r"algorithm must be one of \('muoneq', 'adamw'\).*'sgd'"):
        MuonEq([{"params": [torch.zeros(3, 3, requires_grad=True)], "algorithm": "sgd"}])


def test_conv_kernels_are_viewed_as_out_by_fan_in():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 4, 5))
    routes = REG(model).routes
    assert [(r.matrix, r.reason) for r in routes if r.algorithm == "reg"] == [
        ((1, 8, 27), "conv kernel"),
        ((1, 4, 40), "conv kernel"),
    ]


def test_stacked_expert_weights_are_a_batch_of_matrices():
    experts = torch.zeros(4, 8, 6, requires_grad=True)
    route = Muon([("moe.experts.w1", experts)]).routes[0]
    assert (route.matrix, route.reason) == ((4, 8, 6), "expert stack")


def test_add_param_group_routes_new_parameters(tiny_gpt):
    opt = REG(tiny_gpt.blocks[0])
    opt.add_param_group({"params": [torch.zeros(5, 5, requires_grad=True), torch.zeros(5, requires_grad=True)]})
    assert [r.algorithm for r in opt.routes[-2:]] == ["reg", "adamw"]
