"""Invalid hyper-parameters, names and gradients give errors that name the problem."""

import math

import pytest
import torch

from reg_dist import REG, Muon, MuonEq, NorMuon
from reg_dist.ops import equilibrate, newton_schulz, racs

BAD = [
    (REG, {"lr": -1.0}, "lr must be"),
    (REG, {"lr": math.nan}, "lr must be"),
    (REG, {"momentum": 1.0}, r"momentum must be .*\[0.0, 1.0\)"),
    (REG, {"weight_decay": -0.1}, "weight_decay"),
    (REG, {"nesterov": "yes"}, "nesterov must be True or False"),
    (REG, {"scale": "spectral"}, r"scale must be one of \('rms', 'match_rms_adamw', 'original'\)"),
    (REG, {"rms": 0.0}, "rms must be > 0"),
    (REG, {"adamw_betas": (0.9,)}, "adamw_betas must be a pair"),
    (REG, {"adamw_betas": (0.9, 1.5)}, r"adamw_betas\[1\]"),
    (REG, {"adamw_eps": 0.0}, "adamw_eps must be > 0"),
    (REG, {"nonfinite": "ignore"}, r"nonfinite must be one of \('skip', 'raise'\)"),
    (REG, {"p": 0.5}, "p must be a number >= 1"),
    (REG, {"iters": 0}, "iters must be an integer >= 1"),
    (REG, {"iters": 1.5}, "iters must be an integer >= 1"),
    (REG, {"eps": 0.0}, "eps must be a finite number > 0"),
    (REG, {"exponent": 0.5}, "exponent must be a finite number < 0"),
    (REG, {"tol": -0.1}, "tol must be a finite number >= 0"),
    (REG, {"stats": "adam"}, r"stats must be one of \('momentum', 'gradient'\)"),
    (REG, {"stats_beta": 1.0}, r"stats_beta must be a finite number in \[0.0, 1.0\)"),
    (Muon, {"ns_steps": 0}, "ns_steps must be an integer >= 1"),
    (Muon, {"coefficients": "quintic"}, r"coefficients must be one of \('jordan', 'polar_express'\)"),
    (Muon, {"ns_dtype": torch.int32}, "ns_dtype must be one of"),
    (Muon, {"ns_method": "fast"}, r"ns_method must be one of \('standard', 'gram'\), got 'fast'"),
    (NorMuon, {"ns_method": "Gram"}, r"ns_method must be one of \('standard', 'gram'\)"),
    (MuonEq, {"mode": "both"}, r"mode must be one of \('row', 'col', 'rowcol'\)"),
    (MuonEq, {"exponent": math.inf}, "exponent must be a finite number"),
    (MuonEq, {"mode": "rowcol", "phase": -1}, "phase must be None or an integer >= 0"),
    (MuonEq, {"phase": 3}, "phase applies only to mode='rowcol'"),
    (Muon, {"ns_split": "force", "owner_replicas": "repeat"},
     r"ns_split='force' cannot be combined with owner_replicas='repeat'"),
    (MuonEq, {"ns_split": "force", "owner_overlap": True}, r"ns_split='force' cannot be combined with owner_overlap=True"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.zeros(3, 3, requires_grad=True)], **kwargs)


def test_invalid_value_in_a_param_group_is_caught_too():
    with pytest.raises(ValueError, match="momentum must be"):
        REG([{"params": [torch.zeros(3, 3, requires_grad=True)], "momentum": -0.5}])


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        Muon([torch.zeros(3, 3, requires_grad=True)], mode="row")


def test_empty_parameter_list_is_an_error():
    with pytest.raises(ValueError, match="empty parameter list"):
        REG([])


def test_sparse_gradient_is_an_error_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = REG([("emb.weight", emb.weight)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter emb.weight\)"):
        opt.step()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: racs(torch.zeros(5)), r"racs: x must be .*\(\.\.\., m, n\)"),
        (lambda: racs(torch.zeros(3, 3, dtype=torch.int64)), "racs: x must be a floating-point"),
        (lambda: racs(torch.zeros(3, 3), p=0), "p must be"),
        (lambda: racs(torch.zeros(3, 3), exponent=0.5), "exponent must be a finite number < 0"),
        (lambda: equilibrate(torch.zeros(3, 3), mode="rows"), "mode must be one of"),
        (lambda: newton_schulz(torch.zeros(3, 3), coefficients="x"), "coefficients must be one of"),
        (lambda: newton_schulz(torch.zeros(3, 3), steps=-1), "ns_steps must be"),
        (lambda: newton_schulz(torch.zeros(3, 3), method="svd"), "ns_method must be one of"),
    ],
)
def test_operators_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (REG, {"weight_decy": 0.1}, r"REG got an unknown keyword argument 'weight_decy'; did you mean 'weight_decay'\?"),
        (Muon, {"ns_step": 3}, r"'ns_step'; did you mean 'ns_steps'\?"),
        (MuonEq, {"weight_decy": 0.1}, r"'weight_decy'; did you mean 'weight_decay'\?"),
        (REG, {"ns_steps": 3}, r"'ns_steps'; no valid name is close \(the closest is 'eps'\)"),
    ],
    ids=["REG-weight_decy", "Muon-ns_step", "MuonEq-weight_decy", "REG-ns_steps"],
)
def test_misspelled_keyword_names_the_closest_and_lists_the_valid_ones(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        cls([torch.zeros(3, 3, requires_grad=True)], **kwargs)
    assert "Valid names: params, lr, momentum, nesterov, weight_decay" in str(error.value)
    assert "mesh, tp_mode" in str(error.value)  # the engine's layout keywords too


def test_misspelled_layout_keyword_names_the_closest():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"tp_mode, move_dtype") as error:
        Muon(model, tp_mod="gather")
    assert "did you mean 'tp_mode'?" in str(error.value)
    Muon(model, tp_mode="gather", move_dtype=torch.float32, bucket_bytes=2**20)  # valid there


@pytest.mark.parametrize("key,meant", [("lrr", "lr"), ("weight_decy", "weight_decay"), ("nestrov", "nesterov"),
                                       ("momnetum", "momentum")])
def test_param_group_key_one_edit_from_a_hyperparameter_warns(key, meant):
    with pytest.warns(UserWarning, match=rf"param group key '{key}' is not a hyper-parameter; did you mean '{meant}'\?"):
        opt = Muon([{"params": [("w", torch.zeros(3, 3, requires_grad=True))], key: 5.0, "algorithm": "muon"}])
    assert opt.param_groups[0][key] == 5.0  # torch's convention: extra keys are kept


def test_param_group_extra_keys_far_from_any_name_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        REG([{"params": [("w", torch.zeros(3, 3, requires_grad=True))], "algorithm": "reg", "name": "blocks",
              "lr_mult": 0.5, "initial_lr": 0.1}])
