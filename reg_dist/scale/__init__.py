"""The scale model: what REG, Muon and MuonEq cost per optimizer step at a scale no test machine has.

    shapes     model shape presets (GPT-3 125M … 175B, LLaMA 7B … 405B, MoE) and ``from_module``
    parallel   the layout: nodes × GPUs per node = dp × tp × pp, FSDP2 (or HSDP) / native / replicated
    cluster    H100 / H200 node presets (figures cited there)
    traffic    reg_dist's collectives per rank per step (equal to ``comm_stats()``: the calibration
               test checks it on every layout the tests can run), the owner plans from the real
               planner (owner groups, HSDP replicas, overlapped rounds: ``Settings``), Newton–Schulz
               work and optimizer state per rank
    split      the split Newton–Schulz plan of an owner group (``comm.split``), predicted
    hops       the owner moves in two hops over owner groups (``comm.hops``), predicted
    timing     alpha–beta times of ring / tree all-reduces, reduce-scatters, all-gathers, all-to-alls
    predict    everything per step for AdamW (ZeRO-1), REG, Muon and MuonEq: bytes and calls per
               group, state per rank, Newton–Schulz FLOPs on the busiest rank, RACS memory traffic,
               optimizer time as a fraction of forward+backward, and where the design stops scaling

No process group is made (no torch.distributed here): the model reads shapes and layouts only, and
imports the ownership planner and the helpers that define reg_dist's wire bytes.
"""

from .cluster import CLUSTERS, H100, H200, Cluster, cluster
from .parallel import Parallel
from .predict import ALL, NAMES, Prediction, batch_tokens, essential_ai, predict, predict_all
from .shapes import ADAMW, COLWISE, MATRIX, PRESETS, ROWWISE, Model, Param, dense, from_module, moe, preset
from .traffic import OPTIMIZERS, Settings, Traffic, ns_flops, traffic

__all__ = [
    "ADAMW", "ALL", "CLUSTERS", "COLWISE", "H100", "H200", "MATRIX", "NAMES", "OPTIMIZERS", "PRESETS", "ROWWISE",
    "Cluster", "Model", "Param", "Parallel", "Prediction", "Settings", "Traffic", "batch_tokens", "cluster",
    "dense", "essential_ai", "from_module", "moe", "ns_flops", "predict", "predict_all", "preset", "traffic",
]
