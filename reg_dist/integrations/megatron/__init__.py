"""Megatron-LM / megatron-core: ``flags`` (``--optimizer reg|reg_muon|muoneq|normuon`` and their flags,
``register()``), ``layouts`` (tensor-parallel weights as layouts), ``optimizer`` (the registry entries,
DDP and the flat distributed optimizer). The public entry point is ``reg_dist.megatron``."""
