"""Model shapes: every parameter of a model as the optimizer sees it, and presets from 125M to 405B.

A ``Param`` is one trainable tensor: its logical shape, whether the optimizer routes it to the
matrix algorithm (REG / Muon / MuonEq) or to AdamW, which dimension tensor parallelism splits
(0: a column-parallel weight's output rows, 1: a row-parallel weight's input columns), and the fused
row blocks that are separate matrices (QKV, gate/up; a 3-D ``(E, m, n)`` expert stack is E of them).
A ``Model`` is the parameters in registration order (the order ``reg_dist`` builds its groups and
native-mode streams in) plus the few sizes the layout checks and the FLOP count need.

The presets follow the published configurations (sources in ``PRESETS``' docstrings and in each
``Model.source``); ``from_module`` reads any ``nn.Module`` (a meta-device one is enough) with
``reg_dist``'s own routing, so a user's model needs no hand-written shapes.
"""

import dataclasses
import fnmatch
import math
from dataclasses import dataclass

from torch import nn

from ..layout import FUSED_ATTR, block_shapes, check_segments, fused_rows
from ..layout.rects import Segment
from ..ops.stats import check_count
from ..optim.routing import module_param_info, route

MATRIX, ADAMW = "matrix", "adamw"
COLWISE, ROWWISE = 0, 1  # the tensor dimension tensor parallelism splits


@dataclass(frozen=True)
class Param:
    """One parameter as the optimizer sees it.

    ``shape``: 1-D (norms, biases), 2-D ``(m, n)`` (``nn.Linear.weight`` is (out, in)) or a 3-D
    expert stack ``(E, m, n)``. ``tp``: the dimension tensor parallelism splits (``COLWISE`` = 0,
    ``ROWWISE`` = 1) or None (a copy on every TP rank); a 3-D stack may only be split along its
    experts (0). ``fused``: segments ``(start, end, k)`` of the rows of a 2-D matrix, matrix k being
    its segments' rows (``reg_dist.layout.fused_rows``). ``layer``: the transformer block the
    parameter belongs to (None: outside the blocks), for pipeline stages.
    """

    name: str
    shape: tuple[int, ...]
    algorithm: str = MATRIX
    tp: int | None = None
    fused: tuple[Segment, ...] | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        object.__setattr__(self, "shape", shape)
        if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
            raise ValueError(f"parameter {self.name}: shape must be positive integers, got {self.shape!r}")
        if self.algorithm not in (MATRIX, ADAMW):
            raise ValueError(f"parameter {self.name}: algorithm must be {MATRIX!r} or {ADAMW!r}, got {self.algorithm!r}")
        if self.algorithm == MATRIX and len(shape) not in (2, 3):
            raise ValueError(f"parameter {self.name} of shape {list(shape)}: a matrix algorithm needs a 2-D matrix "
                             f"or a 3-D expert stack; route it to {ADAMW!r}")
        if self.tp is not None and (self.tp not in (COLWISE, ROWWISE) or self.tp >= len(shape)):
            raise ValueError(f"parameter {self.name} of shape {list(shape)}: tp must be None, 0 or 1 "
                             f"(a dimension it has), got {self.tp!r}")
        if len(shape) == 3 and self.tp == ROWWISE:
            raise ValueError(f"3-D expert stack {self.name} may be split by tensor parallelism along its experts "
                             f"(tp=0) only, got tp=1")
        if self.fused is not None:
            if len(shape) != 2:
                raise ValueError(f"parameter {self.name}: fused row blocks need a 2-D matrix, got {list(shape)}")
            try:
                check_segments(self.fused, shape[0])
            except ValueError as e:
                raise ValueError(f"parameter {self.name}: {e}") from None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def logical(self) -> tuple[int, int]:
        """The logical 2-D matrix ``(M, N)`` reg_dist's layouts describe: ``(E·m, n)`` for a stack."""
        if len(self.shape) == 3:
            return self.shape[0] * self.shape[1], self.shape[2]
        if len(self.shape) == 2:
            return self.shape
        return self.shape[0], 1

    @property
    def unit_rows(self) -> int:
        """Logical rows per index of dimension 0 (the unit data and tensor parallelism cut in)."""
        return self.shape[1] if len(self.shape) == 3 else 1

    @property
    def segments(self) -> tuple[Segment, ...]:
        if len(self.shape) == 3:
            return fused_rows((self.shape[1],) * self.shape[0])
        return self.fused if self.fused is not None else ((0, self.logical[0], 0),)

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """``(rows, n)`` of every separate matrix inside the parameter."""
        return block_shapes(self.segments, self.logical[1])

    @property
    def view(self) -> tuple[int, int, int]:
        """``(count, m, n)``, the routing's matrix view (fused blocks are not in it)."""
        if len(self.shape) == 3:
            return self.shape
        return (1, *self.logical)


@dataclass(frozen=True)
class Model:
    """A model's parameters (registration order) and the sizes the layout checks and FLOPs need.

    ``heads`` / ``kv_heads`` / ``ffn`` (None: unknown, not checked) must divide by the tensor-parallel
    degree; ``flop_params`` is N in the 6·N·T FLOPs of forward+backward (the parameters one token
    multiplies: no input embedding, top-k of the experts); ``batch_tokens`` the reference global
    batch in tokens, ``seq_len`` the sequence length.
    """

    name: str
    params: tuple[Param, ...]
    layers: int
    d_model: int
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    experts: int = 0
    top_k: int = 0
    flop_params: int | None = None
    seq_len: int = 2048
    batch_tokens: int = 2**21
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if not self.params:
            raise ValueError(f"model {self.name} has no parameters")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name}: parameter names repeat")
        for field in ("layers", "d_model", "seq_len", "batch_tokens"):
            check_count(f"{self.name}: {field}", getattr(self, field))
        for field in ("heads", "kv_heads", "ffn", "flop_params"):
            if getattr(self, field) is not None:
                check_count(f"{self.name}: {field}", getattr(self, field))
        if self.heads is not None and self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"model {self.name}: {self.kv_heads} key/value heads do not divide {self.heads} heads")
        if self.flop_params is None:
            object.__setattr__(self, "flop_params", self.numel)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def matrix_numel(self) -> int:
        return sum(p.numel for p in self.params if p.algorithm == MATRIX)

    @property
    def matrices(self) -> int:
        """Separate matrices (fused blocks and experts counted one by one)."""
        return sum(len(p.blocks) for p in self.params if p.algorithm == MATRIX)

    def stage(self, stages: int, index: int) -> "Model":
        """The parameters pipeline stage ``index`` of ``stages`` holds: contiguous blocks of layers (the
        first stages take one more when they do not divide), what comes before the blocks on the
        first stage, what comes after on the last."""
        if not 0 <= index < stages:
            raise ValueError(f"stage {index} of {stages} does not exist")
        per, extra = divmod(self.layers, stages)
        first = index * per + min(index, extra)
        last = first + per + (index < extra)
        seen_layer, keep = False, []
        for p in self.params:
            if p.layer is None:
                if (not seen_layer and index == 0) or (seen_layer and index == stages - 1):
                    keep.append(p)
            else:
                seen_layer = True
                if first <= p.layer < last:
                    keep.append(p)
        share = sum(p.numel for p in keep) / self.numel
        return dataclasses.replace(self, name=f"{self.name}[stage {index}/{stages}]", params=tuple(keep),
                                   layers=last - first, flop_params=max(1, round(self.flop_params * share)))


# ---- presets --------------------------------------------------------------------------------------

def _norm(name: str, d: int, bias: bool, layer: int | None) -> list[Param]:
    out = [Param(f"{name}.weight", (d,), ADAMW, layer=layer)]
    return out + [Param(f"{name}.bias", (d,), ADAMW, layer=layer)] if bias else out


def _linear(name: str, out_f: int, in_f: int, tp: int | None, bias: bool, layer: int | None) -> list[Param]:
    out = [Param(f"{name}.weight", (out_f, in_f), MATRIX, tp=tp, layer=layer)]
    if bias:  # a column-parallel bias is split with the rows; a row-parallel one is a copy
        out.append(Param(f"{name}.bias", (out_f,), ADAMW, tp=COLWISE if tp == COLWISE else None, layer=layer))
    return out


def dense(name: str, layers: int, d: int, heads: int, kv_heads: int, ffn: int, vocab: int, *, gated: bool,
          tied: bool, bias: bool, positions: int = 0, head_dim: int | None = None, seq_len: int = 2048,
          batch_tokens: int = 2**21, source: str = "") -> Model:
    """A GPT- or LLaMA-style decoder: embedding, ``layers`` blocks of norm + q, k, v, o projections and
    norm + MLP (gate, up, down when ``gated``, else up, down), a final norm and the output head (tied to
    the embedding when ``tied``). q/k/v and gate/up are column-parallel, o and down row-parallel, the
    embedding and head split over the vocabulary, as in Megatron-LM and torchtitan."""
    hd = head_dim or d // heads
    params = [Param("embed.weight", (vocab, d), ADAMW, tp=COLWISE)]
    if positions:
        params.append(Param("pos_embed.weight", (positions, d), ADAMW))
    for i in range(layers):
        b = f"layers.{i}"
        params += _norm(f"{b}.attn_norm", d, bias, i)
        params += _linear(f"{b}.attn.q", heads * hd, d, COLWISE, bias, i)
        params += _linear(f"{b}.attn.k", kv_heads * hd, d, COLWISE, bias, i)
        params += _linear(f"{b}.attn.v", kv_heads * hd, d, COLWISE, bias, i)
        params += _linear(f"{b}.attn.o", d, heads * hd, ROWWISE, bias, i)
        params += _norm(f"{b}.mlp_norm", d, bias, i)
        if gated:
            params += _linear(f"{b}.mlp.gate", ffn, d, COLWISE, bias, i)
        params += _linear(f"{b}.mlp.up", ffn, d, COLWISE, bias, i)
        params += _linear(f"{b}.mlp.down", d, ffn, ROWWISE, bias, i)
    params += _norm("final_norm", d, bias, None)
    if not tied:
        params.append(Param("head.weight", (vocab, d), ADAMW, tp=COLWISE))
    total = sum(p.numel for p in params)
    flops = total - vocab * d * (0 if tied else 1) - positions * d  # no FLOPs in the lookups; a tied head counts once
    return Model(name, tuple(params), layers, d, heads, kv_heads, ffn, flop_params=flops, seq_len=seq_len,
                 batch_tokens=batch_tokens, source=source)


def moe(name: str, layers: int, d: int, heads: int, kv_heads: int, vocab: int, *, experts: int, top_k: int,
        expert_ffn: int, shared_ffn: int = 0, dense_layers: int = 0, dense_ffn: int = 0, head_dim: int | None = None,
        mla: dict | None = None, seq_len: int = 4096, batch_tokens: int = 2**22, source: str = "") -> Model:
    """A mixture-of-experts decoder (untied head, gated MLPs, no biases): attention (plain q, k, v, o, or
    DeepSeek's multi-head latent attention with ``mla`` = dict(q, kv_rank, rope, v)), then
    ``dense_layers`` gated MLPs of ``dense_ffn`` and, in the other layers, a router ``(E, d)`` (a matrix,
    as the default routing sends it), ``experts`` gated experts of ``expert_ffn`` as 3-D stacks
    ``(E, ffn, d)``, ``(E, ffn, d)``, ``(E, d, ffn)`` split along the experts by tensor parallelism, and
    a shared gated expert of ``shared_ffn``."""
    hd = head_dim or d // heads
    params = [Param("embed.weight", (vocab, d), ADAMW, tp=COLWISE)]
    expert_numel = 0
    for i in range(layers):
        b = f"layers.{i}"
        params += _norm(f"{b}.attn_norm", d, False, i)
        if mla is None:
            params += _linear(f"{b}.attn.q", heads * hd, d, COLWISE, False, i)
            params += _linear(f"{b}.attn.k", kv_heads * hd, d, COLWISE, False, i)
            params += _linear(f"{b}.attn.v", kv_heads * hd, d, COLWISE, False, i)
            params += _linear(f"{b}.attn.o", d, heads * hd, ROWWISE, False, i)
        else:
            params += _linear(f"{b}.attn.q", heads * mla["q"], d, COLWISE, False, i)
            params += _linear(f"{b}.attn.kv_a", mla["kv_rank"] + mla["rope"], d, None, False, i)
            params += _norm(f"{b}.attn.kv_norm", mla["kv_rank"], False, i)
            params += _linear(f"{b}.attn.kv_b", heads * (mla["q"] - mla["rope"] + mla["v"]), mla["kv_rank"], COLWISE,
                              False, i)
            params += _linear(f"{b}.attn.o", d, heads * mla["v"], ROWWISE, False, i)
        params += _norm(f"{b}.mlp_norm", d, False, i)
        if i < dense_layers:
            params += _linear(f"{b}.mlp.gate", dense_ffn, d, COLWISE, False, i)
            params += _linear(f"{b}.mlp.up", dense_ffn, d, COLWISE, False, i)
            params += _linear(f"{b}.mlp.down", d, dense_ffn, ROWWISE, False, i)
            continue
        params.append(Param(f"{b}.moe.router.weight", (experts, d), MATRIX, layer=i))
        for part, shape in (("gate", (experts, expert_ffn, d)), ("up", (experts, expert_ffn, d)),
                            ("down", (experts, d, expert_ffn))):
            params.append(Param(f"{b}.moe.experts.{part}", shape, MATRIX, tp=COLWISE, layer=i))
            expert_numel += math.prod(shape)
        if shared_ffn:
            params += _linear(f"{b}.moe.shared.gate", shared_ffn, d, COLWISE, False, i)
            params += _linear(f"{b}.moe.shared.up", shared_ffn, d, COLWISE, False, i)
            params += _linear(f"{b}.moe.shared.down", d, shared_ffn, ROWWISE, False, i)
    params += _norm("final_norm", d, False, None)
    params.append(Param("head.weight", (vocab, d), ADAMW, tp=COLWISE))
    total = sum(p.numel for p in params)
    flops = total - vocab * d - expert_numel + expert_numel * top_k // experts
    ffn = math.gcd(expert_ffn, shared_ffn or expert_ffn, dense_ffn or expert_ffn)
    return Model(name, tuple(params), layers, d, heads, kv_heads, ffn, experts=experts, top_k=top_k,
                 flop_params=flops, seq_len=seq_len, batch_tokens=batch_tokens, source=source)


GPT3 = "Brown et al. 2020, Language Models are Few-Shot Learners, arXiv 2005.14165, Table 2.1"
LLAMA2 = "Touvron et al. 2023, Llama 2, arXiv 2307.09288 (and the released params.json: 7B ffn 11008, 70B ffn 28672)"
LLAMA3 = "Llama Team 2024, The Llama 3 Herd of Models, arXiv 2407.21783, Table 3 (405B: 126 layers, 16384 wide, ffn 53248)"


def _gpt(name: str, layers: int, d: int, heads: int, batch: int) -> Model:
    return dense(name, layers, d, heads, heads, 4 * d, 50257, gated=False, tied=True, bias=True, positions=2048,
                 seq_len=2048, batch_tokens=batch, source=GPT3)


PRESETS = {
    "gpt-125m": lambda: _gpt("gpt-125m", 12, 768, 12, 2**19),
    "gpt-350m": lambda: _gpt("gpt-350m", 24, 1024, 16, 2**19),
    "gpt-1.3b": lambda: _gpt("gpt-1.3b", 24, 2048, 16, 2**20),
    "gpt-2.7b": lambda: _gpt("gpt-2.7b", 32, 2560, 32, 2**20),
    "gpt-6.7b": lambda: _gpt("gpt-6.7b", 32, 4096, 32, 2**21),
    "gpt-175b": lambda: _gpt("gpt-175b", 96, 12288, 96, 3 * 2**20),
    "llama-7b": lambda: dense("llama-7b", 32, 4096, 32, 32, 11008, 32000, gated=True, tied=False, bias=False,
                              seq_len=4096, batch_tokens=2**22, source=LLAMA2),
    "llama-13b": lambda: dense("llama-13b", 40, 5120, 40, 40, 13824, 32000, gated=True, tied=False, bias=False,
                               seq_len=4096, batch_tokens=2**22, source=LLAMA2),
    "llama3-8b": lambda: dense("llama3-8b", 32, 4096, 32, 8, 14336, 128256, gated=True, tied=False, bias=False,
                               seq_len=8192, batch_tokens=2**22, source=LLAMA3),
    "llama-70b": lambda: dense("llama-70b", 80, 8192, 64, 8, 28672, 32000, gated=True, tied=False, bias=False,
                               seq_len=4096, batch_tokens=2**22, source=LLAMA2),
    "llama-405b": lambda: dense("llama-405b", 126, 16384, 128, 8, 53248, 128256, gated=True, tied=False, bias=False,
                                seq_len=8192, batch_tokens=2**24, source=LLAMA3),
    "mixtral-8x7b": lambda: moe("mixtral-8x7b", 32, 4096, 32, 8, 32000, experts=8, top_k=2, expert_ffn=14336,
                                source="Jiang et al. 2024, Mixtral of Experts, arXiv 2401.04088, Table 1; "
                                       "batch 4M tokens assumed (not published)"),
    "moonlight-16b-a3b": lambda: moe(
        "moonlight-16b-a3b", 27, 2048, 16, 16, 163840, experts=64, top_k=6, expert_ffn=1408, shared_ffn=2 * 1408,
        dense_layers=1, dense_ffn=11264, mla={"q": 192, "kv_rank": 512, "rope": 64, "v": 128}, seq_len=8192,
        source="Liu et al. 2025, Muon is Scalable for LLM Training (Moonlight), arXiv 2502.16982, and the released "
               "config.json (DeepSeek-V3-style MLA, 64 experts top-6, 2 shared); batch 4M tokens assumed"),
    "qwen3-30b-a3b": lambda: moe(
        "qwen3-30b-a3b", 48, 2048, 32, 4, 151936, experts=128, top_k=8, expert_ffn=768, head_dim=128,
        source="Qwen3 Technical Report, arXiv 2505.09388, and the released config.json (48 layers, 2048 wide, "
               "32 q / 4 kv heads of 128, 128 experts of 768, top-8); batch 4M tokens assumed"),
}
"""Preset name → builder. GPT: GPT-3 shapes (tied head, learned positions, biases, 4·d MLP) with GPT-3's
batch sizes; LLaMA: Llama 2 7B/13B/70B (4M-token batches) and Llama 3 8B/405B (405B: 16M tokens, its
final batch); MoE: Mixtral 8x7B, Moonlight-16B-A3B (the Moonlight anchor) and Qwen3-30B-A3B (the
stand-in for the Megatron anchor). Sources in each ``Model.source``."""


def preset(name: str) -> Model:
    """The preset ``name`` (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---- any nn.Module --------------------------------------------------------------------------------

TP_STYLES = {"colwise": COLWISE, "rowwise": ROWWISE}


def from_module(module: nn.Module, tp: dict[str, str] | None = None, name: str | None = None, **sizes) -> Model:
    """A ``Model`` from ``module`` (parameters on any device, "meta" included), routed by reg_dist's own
    default rule (``reg_dist.optim.routing``), in the order reg_dist sees them; fused rows set by
    ``reg_dist.mark_fused`` are kept. ``tp`` maps module names (``fnmatch`` patterns on the full
    name or on its last component) to "colwise" (weight and bias split along the output rows) or
    "rowwise" (weight split along the input columns), as ``parallelize_module``'s plans do.
    ``sizes`` go to ``Model`` (``layers``, ``d_model``, ``heads``, …); layers default to 1."""

    tp = dict(tp or {})
    for key, style in tp.items():
        if style not in TP_STYLES:
            raise ValueError(f"tp plan entry {key!r}: style must be one of {tuple(TP_STYLES)}, got {style!r}")
    def style_of(mod_name: str) -> str | None:
        for key, style in tp.items():
            if fnmatch.fnmatchcase(mod_name, key) or fnmatch.fnmatchcase(mod_name.rsplit(".", 1)[-1], key):
                return style
        return None

    params = []
    for t, info in module_param_info(module):
        r = route(t, info, None, MATRIX)
        mod_name, _, leaf = info.names[0].rpartition(".")
        style = style_of(mod_name)
        split = COLWISE if style == "colwise" else ROWWISE if style == "rowwise" and leaf == "weight" else None
        fused = getattr(t, FUSED_ATTR, None)
        if r.matrix is None:
            params.append(Param(info.names[0], tuple(t.shape), ADAMW, tp=split))
        else:  # the routing's view: (m, n), an (E, m, n) stack, or a conv kernel as out × (in·Πk)
            count, m, n = r.matrix
            shape = (m, n) if count == 1 and t.ndim != 3 else (count, m, n)
            params.append(Param(info.names[0], shape, MATRIX, tp=split, fused=tuple(fused) if fused is not None else None))
    sizes.setdefault("layers", 1)
    sizes.setdefault("d_model", max(p.shape[-1] for p in params))
    return Model(name or type(module).__name__, tuple(params), **sizes)
