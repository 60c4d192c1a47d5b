"""``reg_dist.megatron``: ``--optimizer reg`` (and every registry algorithm's Megatron name) for
Megatron-LM / megatron-core (see ``reg_dist.integrations.megatron.flags``). Needs megatron-core."""

from .integrations.megatron.flags import (NAMES, Settings, check_args, extend_megatron_arguments, extra_args_provider,
                                          keep_distributed_optimizer, optimizer_config, parse_and_validate_args,
                                          register, with_args)

__all__ = ["NAMES", "Settings", "register", "extra_args_provider", "with_args", "optimizer_config", "check_args",
           "parse_and_validate_args", "keep_distributed_optimizer", "extend_megatron_arguments"]
