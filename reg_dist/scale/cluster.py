"""Cluster descriptions: per-GPU matmul rate and memory, and the two link classes of the
alpha–beta model (NVLink inside a node, InfiniBand between nodes).

Figures of the presets, and where they come from:

* H100 SXM5 80 GB: 989 TFLOP/s dense BF16 (the datasheet's 1,979 is with 2:4 sparsity), HBM3
  3.35 TB/s, NVLink 4 at 900 GB/s per GPU (both directions: 450 GB/s each way) — NVIDIA H100 Tensor
  Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/ .
* H200 SXM 141 GB: the same 989 TFLOP/s dense BF16 and NVLink 4 (900 GB/s), HBM3e 4.8 TB/s —
  NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/ .
* Nodes of 8 GPUs (HGX/DGX H100 and H200), one 400 Gb/s NDR InfiniBand ConnectX-7 port per GPU on a
  rail-optimised fabric: 50 GB/s each way per GPU — NVIDIA DGX H100 user guide (network ports) and
  the DGX SuperPOD reference architecture, https://docs.nvidia.com/dgx/dgxh100-user-guide/ .
* Latencies (per ring step, and per collective launch), NCCL's own tuning model for its "Simple"
  protocol (src/graph/tuning.cc, NCCL 2.18–2.21: ``baseLat`` ring 8.4 µs; ``hwLat`` ring NVLink
  3.4 µs, network 14 µs): a conservative choice for the small statistics messages, which NCCL
  would send with its LL protocols (0.6 / 2.7 µs per step).
"""

from dataclasses import dataclass

from ..ops.stats import check_count


@dataclass(frozen=True)
class Cluster:
    """Per-GPU rates and the links. Bandwidths are per GPU and per direction, in bytes/s."""

    name: str
    gpus_per_node: int
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float  # capacity
    nvlink_bytes_per_s: float  # per direction
    nvlink_latency_s: float  # per ring step inside a node
    ib_bytes_per_s: float  # one NIC per GPU, per direction
    ib_latency_s: float  # per ring step between nodes
    launch_latency_s: float  # per collective
    source: str = ""

    def __post_init__(self) -> None:
        check_count(f"cluster {self.name}: gpus_per_node", self.gpus_per_node)
        for field in ("bf16_flops", "hbm_bytes_per_s", "hbm_bytes", "nvlink_bytes_per_s", "ib_bytes_per_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"cluster {self.name}: {field} must be a positive number, got {value!r}")
        for field in ("nvlink_latency_s", "ib_latency_s", "launch_latency_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"cluster {self.name}: {field} must be a number >= 0, got {value!r}")


_NCCL = dict(nvlink_latency_s=3.4e-6, ib_latency_s=14e-6, launch_latency_s=8.4e-6)

H100 = Cluster("H100 SXM5 80GB, 8/node, NVLink 4 + 8×400 Gb/s NDR IB", 8, 989e12, 3.35e12, 80e9, 450e9,
               ib_bytes_per_s=50e9, source="NVIDIA H100 datasheet; DGX H100 user guide; NCCL tuning.cc", **_NCCL)
H200 = Cluster("H200 SXM 141GB, 8/node, NVLink 4 + 8×400 Gb/s NDR IB", 8, 989e12, 4.8e12, 141e9, 450e9,
               ib_bytes_per_s=50e9, source="NVIDIA H200 datasheet; DGX H200 user guide; NCCL tuning.cc", **_NCCL)

CLUSTERS = {"h100": H100, "h200": H200}


def cluster(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster preset {name!r}; known: {', '.join(CLUSTERS)}")
    return CLUSTERS[name]
