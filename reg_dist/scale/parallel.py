"""The parallel layout of a job: nodes × GPUs per node = dp × tp × pp, and how data parallelism
shards the parameters (the ZeRO stage, in reg_dist's terms).

    zero=3   FSDP2 (``fully_shard``): every parameter row-sharded over dp (after tensor parallelism),
             reg_dist steps the shards: statistics path for REG/MuonEq, owner path over the whole
             dp × tp mesh for Muon/MuonEq. With ``shard`` < dp, HSDP: a (replicate, shard) mesh of
             dp / shard replicas, each parameter row-sharded over the shard group only
    zero=1   reg_dist's native data parallelism (``REG(model, mesh=(dp, tp))``): whole matrices owned
             over dp (ZeRO-1-like state, gradients reduce-scattered to the owners), owner moves only
             over tp
    zero=0   replicated data parallelism (DDP): only tensor parallelism shards; the TP DTensors'
             owner plan spans their root (dp, tp) mesh (copies over dp moved once, the Newton–Schulz
             work spread over every rank), every other matrix is stepped whole on every rank

Ranks are laid out pp-major, then dp, then tp (tp innermost, so a tp group sits inside a node when
tp divides the GPUs per node), as torchtitan's and Megatron-LM's default meshes do. reg_dist itself has
no pipeline support yet: with ``pp > 1`` the model takes each stage to run its own optimizer over
its own dp × tp ranks (the only thing shared is the one-int non-finite agreement over the world).
"""

from dataclasses import dataclass

from ..ops.stats import check_count
from .shapes import Model

ZERO_STAGES = {0: "replicated (DDP)", 1: "reg_dist native (whole-matrix owners, ZeRO-1-like)", 3: "FSDP2"}


@dataclass(frozen=True)
class Parallel:
    """``nodes × gpus_per_node`` GPUs as ``dp × tp × pp``; ``dp`` is derived (or checked when given)."""

    nodes: int
    gpus_per_node: int
    tp: int = 1
    pp: int = 1
    zero: int = 3
    dp: int | None = None
    shard: int | None = None  # HSDP's shard group (zero 3): dp = replicas × shard; None: FSDP2 over all dp

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "tp", "pp"):
            check_count(name, getattr(self, name))
        if self.zero not in ZERO_STAGES or isinstance(self.zero, bool):
            raise ValueError(f"zero must be one of {tuple(ZERO_STAGES)} "
                             f"({'; '.join(f'{k}: {v}' for k, v in ZERO_STAGES.items())}), got {self.zero!r}; "
                             f"ZeRO-2 moves what ZeRO-1 does in the optimizer step: use 1")
        world = self.nodes * self.gpus_per_node
        if world % (self.tp * self.pp):
            raise ValueError(f"world size {world} ({self.nodes} nodes × {self.gpus_per_node} GPUs) is not "
                             f"dp × tp × pp for tp={self.tp}, pp={self.pp}: {self.tp * self.pp} does not divide it")
        dp = world // (self.tp * self.pp)
        if self.dp is not None:
            check_count("dp", self.dp)
        if self.dp is not None and self.dp != dp:
            raise ValueError(f"world size {world} is not dp × tp × pp = {self.dp} × {self.tp} × {self.pp} "
                             f"= {self.dp * self.tp * self.pp}")
        object.__setattr__(self, "dp", dp)
        if self.shard is not None:
            check_count("shard", self.shard)
            if self.zero != 3 or dp % self.shard or self.shard == dp:
                raise ValueError(f"shard={self.shard} must be HSDP's shard group under zero 3: a divisor of dp={dp} "
                                 f"below it (zero={self.zero})")

    @property
    def hsdp(self) -> bool:
        return self.shard is not None

    @property
    def dp_dims(self) -> tuple[str, ...]:
        """The data-parallel mesh dims, as the meshes of the calibrated runs name them."""
        return ("replicate", "shard") if self.hsdp else ("dp",)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def stage_ranks(self) -> int:
        """Ranks of one pipeline stage (dp × tp)."""
        return self.dp * self.tp

    @property
    def tp_spans_nodes(self) -> bool:
        return self.tp > self.gpus_per_node or self.gpus_per_node % self.tp != 0

    def describe(self) -> str:
        pp = f" × pp {self.pp}" if self.pp > 1 else ""
        hsdp = f" (HSDP: {self.dp // self.shard} replicas × shard {self.shard})" if self.hsdp else ""
        return (f"{self.world} GPUs ({self.nodes}×{self.gpus_per_node}) = dp {self.dp}{hsdp} × tp {self.tp}{pp}, "
                f"zero {self.zero} ({ZERO_STAGES[self.zero]})")

    def check(self, model: Model) -> None:
        """Raise ValueError if ``model`` cannot be laid out so: tp must divide the heads, the key/value
        heads and the MLP width (whole heads and columns per rank), pp at most the layers."""
        for field, what in (("heads", "attention heads"), ("kv_heads", "key/value heads"), ("ffn", "MLP width")):
            size = getattr(model, field)
            if size is not None and size % self.tp:
                raise ValueError(f"tp={self.tp} does not divide the {size} {what} of {model.name}")
        if self.pp > model.layers:
            raise ValueError(f"{self.pp} pipeline stages for the {model.layers} layers of {model.name}: "
                             f"pp must be at most the number of layers")
