"""``reg_dist.deepspeed.initialize``: ``deepspeed.initialize`` with REG, MuonEq and reg_dist's Muon
named in the JSON config (see ``reg_dist.integrations.deepspeed``). Needs DeepSpeed installed."""

from .integrations.deepspeed import OPTIMIZERS, RegDistAdapter, initialize, valid_params

__all__ = ["OPTIMIZERS", "RegDistAdapter", "initialize", "valid_params"]
