"""``reg_dist.deepspeed``: REG, MuonEq, reg_dist's Muon and NorMuon under DeepSpeed ZeRO 0-3, named in
the JSON config or given as ``optimizer=`` (see ``reg_dist.integrations.deepspeed``). ``register()``
makes ``deepspeed.initialize`` do it for every caller (the Hugging Face Trainer, Accelerate);
``initialize`` does it without patching; ``save_checkpoint`` / ``load_checkpoint`` resume at another
ZeRO stage or data-parallel world size (``reg_dist.integrations.deepspeed_checkpoint``). Needs
DeepSpeed installed."""

from .integrations.deepspeed import OPTIMIZERS, RegDistAdapter, initialize, register, valid_params
from .integrations.deepspeed_checkpoint import load_checkpoint, save_checkpoint

__all__ = ["OPTIMIZERS", "RegDistAdapter", "initialize", "load_checkpoint", "register", "save_checkpoint",
           "valid_params"]
