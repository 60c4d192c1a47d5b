"""Which algorithm each parameter gets, and how a matrix algorithm views it."""

import logging
import warnings

import pytest
import torch
from torch import nn

from conftest import TinyGPT
from reg_dist import REG, Muon, MuonEq
from reg_dist.optim.routing import parse_params


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


# ---- the same routing whichever way the parameters are passed, or a warning (issue 16) ------------


class TokModel(nn.Module):
    """An embedding named ``tok`` (no embed/wte/wpe in the name) tied to an output layer named ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.tok.weight


def _algorithms(opt):
    return {id(p): g["algorithm"] for g in opt.param_groups for p in g["params"]}


def _names(opt):
    return {id(p): name for g in opt.param_groups for p, name in zip(g["params"], g["param_names"])}


@pytest.mark.parametrize("form", ["named_parameters", "list"])
@pytest.mark.parametrize("make", [TinyGPT, TokModel])
def test_routing_is_the_module_routing_or_a_warning_names_the_difference(make, form):
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a module: no warning
        reference = _algorithms(REG(model))
    params = list(model.named_parameters()) if form == "named_parameters" else list(model.parameters())
    with pytest.warns(UserWarning, match="came without their module") as record:
        opt = REG(params)
    assert len([w for w in record if "without their module" in str(w.message)]) == 1
    message = str(record[0].message)
    got, names = _algorithms(opt), _names(opt)
    differ = [names[i] for i in got if got[i] != reference[i]]
    assert all(name in message for name in differ)
    expected = {
        (TinyGPT, "named_parameters"): [],  # wte / wpe are embeddings by name; the head is tied to wte
        (TinyGPT, "list"): ["param0", "param1"],
        (TokModel, "named_parameters"): ["tok.weight"],
        (TokModel, "list"): ["param0"],
    }[(make, form)]
    assert differ == expected
    if make is TokModel and form == "named_parameters":
        assert "tok.weight [20, 8]" in message and 'algorithm="adamw"' in message and "REG(model)" in message


def test_no_warning_when_every_matrix_group_names_its_algorithm_or_comes_as_a_module():
    model = TokModel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = Muon([{"params": [model.tok.weight], "algorithm": "adamw"},
                    {"params": [model.body.weight], "algorithm": "muon"},
                    {"params": [model.body.bias]}])  # 1-D: goes to AdamW whatever its source
        assert [r.algorithm for r in opt.routes] == ["adamw", "muon", "adamw"]
        Muon([{"params": model.body, "lr": 0.1}, {"params": [model.tok.weight], "algorithm": "adamw"}])


def test_parse_params_gives_torch_style_groups_and_the_module_infos():
    model = TokModel()
    groups, infos = parse_params(model)
    assert [n for n, _ in groups[0]["params"]] == ["tok.weight", "body.weight", "body.bias"]
    assert infos[id(model.tok.weight)].names == ("tok.weight", "out.weight") and infos[id(model.tok.weight)].embedding
    groups, infos = parse_params([{"params": model.body.weight, "lr": 0.1}, {"params": model.body, "algorithm": "adamw"}])
    assert groups[0] == {"params": [model.body.weight], "lr": 0.1} and infos.keys() == {id(model.body.weight),
                                                                                          id(model.body.bias)}
    with pytest.raises(ValueError, match="empty parameter list"):
        parse_params([])


# ---- the last layer's hint: an output head with an unlisted name --------------------------------

HINT = "matrix (last layer: if it is the output head, use algorithm='adamw')"


def test_last_linear_routed_to_the_matrix_algorithm_gets_a_head_hint():
    routes = {r.name: r.reason for r in REG(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))).routes}
    assert routes == {"0.weight": "matrix", "0.bias": "1-D", "2.weight": HINT, "2.bias": "1-D"}
    model = nn.ModuleDict(dict(enc=nn.Linear(4, 4), decoder=nn.Linear(4, 10)))
    assert {r.name: r.reason for r in Muon(model).routes}["decoder.weight"] == HINT
    layers = nn.ModuleList(nn.ModuleDict(dict(fc=nn.Linear(4, 4), out_proj=nn.Linear(4, 4))) for _ in range(2))
    routes = {r.name: r.reason for r in MuonEq(nn.ModuleDict(dict(layers=layers))).routes}
    assert [n for n, why in routes.items() if why == HINT] == ["layers.1.out_proj.weight"]


def test_no_head_hint_where_the_head_is_recognised_or_in_an_adamw_group(tiny_gpt):
    assert not any("last layer" in r.reason for r in REG(tiny_gpt).routes)  # lm_head: tied to wte
    model = nn.ModuleDict(dict(body=nn.Linear(4, 4), fc2=nn.Linear(4, 10)))
    opt = REG([{"params": model.body}, {"params": model.fc2, "algorithm": "adamw"}])  # one last layer over all
    assert not any("last layer" in r.reason for r in opt.routes)
