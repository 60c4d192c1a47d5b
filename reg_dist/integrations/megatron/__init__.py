"""Megatron-LM / megatron-core: ``flags`` (``--optimizer reg|reg_muon|muoneq|normuon`` and their flags,
``register()``), ``layouts`` (tensor-parallel weights as layouts), ``optimizer`` (the registry entries,
DDP, the flat and the layer-wise distributed optimizers). The public entry point is ``reg_dist.megatron``."""
