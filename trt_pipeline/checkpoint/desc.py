"""ModelDesc: what a TensorRT-LLM checkpoint's config.json says, read once for every consumer.

The reference model, the quantizer and the ONNX lowering all read the model through this class,
so their idea of the structure cannot drift apart. Field names follow TensorRT-LLM 1.2.1
(`PretrainedConfig`, `LLaMAConfig`, `QWenConfig`, `MoeConfig`; facts/trtllm.md §6, §10).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

# Our own config section, for what TensorRT-LLM has no name for (HunYuan's QK norm after RoPE).
EXTRA = "trt_pipeline"
QUANT_ALGOS = ("W4A16_AWQ", "W4A16", "W8A16")
NEVER_QUANTIZED = ("*router*", "*shared_expert_gate*", "*vocab_embedding*")


@dataclass(frozen=True, slots=True)
class MoeDesc:
    num_experts: int
    top_k: int
    intermediate_size: int
    normalization: Literal["renormalize", "none"]  # MoeConfig.normalization_mode 1 / 0
    shared_intermediate_size: int = 0
    shared_gate: bool = False


@dataclass(frozen=True, slots=True)
class QuantDesc:
    algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] = ()

    def quantized(self, module: str) -> bool:
        """Whether a linear (checkpoint prefix, e.g. transformer.layers.0.mlp.fc) is quantized."""
        if self.algo is None:
            return False
        patterns = (*self.exclude_modules, *NEVER_QUANTIZED)
        return not any(fnmatch.fnmatchcase(module, p) for p in patterns)

    @property
    def per_group(self) -> bool:
        return self.algo == "W4A16_AWQ"

    @property
    def bits(self) -> int:
        return 8 if self.algo == "W8A16" else 4


@dataclass(frozen=True, slots=True)
class Linear:
    """One linear of the checkpoint: `name` is the tensor prefix; experts > 0 for stacked MoE."""

    name: str
    in_features: int
    out_features: int
    experts: int = 0


@dataclass(frozen=True, slots=True)
class ModelDesc:
    architecture: str
    family: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    norm_epsilon: float
    max_position_embeddings: int
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    attn_bias: bool
    mlp_bias: bool
    qk_norm: Literal["before_rope", "after_rope"] | None
    tie_word_embeddings: bool
    moe: MoeDesc | None
    quant: QuantDesc = field(default_factory=QuantDesc)
    tp_size: int = 1
    pp_size: int = 1

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDesc:
        extra = cfg.get(EXTRA, {})
        q = cfg.get("quantization") or {}
        moe_cfg = cfg.get("moe") or {}
        moe = None
        if moe_cfg.get("num_experts", 0) > 1:
            moe = MoeDesc(
                num_experts=moe_cfg["num_experts"],
                top_k=moe_cfg["top_k"],
                intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                normalization="renormalize" if moe_cfg.get("normalization_mode", 1) == 1
                else "none",
                shared_intermediate_size=moe_cfg.get("shared_expert_intermediate_size", 0),
                shared_gate=bool(extra.get("shared_expert_gate", False)),
            )
        mapping = cfg.get("mapping") or {}
        heads = cfg["num_attention_heads"]
        return cls(
            architecture=cfg["architecture"],
            family=extra.get("family", cfg["architecture"]),
            dtype=cfg["dtype"],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_size=cfg.get("head_size") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            norm_epsilon=cfg.get("norm_epsilon", 1e-5),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rotary_base=float(cfg.get("rotary_base", 10000.0)),
            rotary_scaling=cfg.get("rotary_scaling"),
            attn_bias=bool(cfg.get("attn_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=(extra.get("qk_norm_position", "before_rope")
                     if cfg.get("qk_layernorm") else None),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            moe=moe,
            quant=QuantDesc(
                algo=q.get("quant_algo"),
                group_size=q.get("group_size", 128),
                has_zero_point=bool(q.get("has_zero_point", False)),
                pre_quant_scale=bool(q.get("pre_quant_scale", False)),
                exclude_modules=tuple(q.get("exclude_modules") or ()),
            ),
            tp_size=mapping.get("tp_size", 1),
            pp_size=mapping.get("pp_size", 1),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def layer_linears(self, i: int) -> list[Linear]:
        """The linears of decoder layer i, in execution order (unsharded shapes)."""
        p = f"transformer.layers.{i}"
        h = self.hidden_size
        out = [
            Linear(f"{p}.attention.qkv", h, self.q_size + 2 * self.kv_size),
            Linear(f"{p}.attention.dense", self.q_size, h),
        ]
        if self.moe is None:
            inter = self.intermediate_size
            out += [Linear(f"{p}.mlp.fc", h, inter), Linear(f"{p}.mlp.gate", h, inter),
                    Linear(f"{p}.mlp.proj", inter, h)]
            return out
        m = self.moe
        out += [Linear(f"{p}.mlp.router", h, m.num_experts),
                Linear(f"{p}.mlp.fc", h, 2 * m.intermediate_size, m.num_experts),
                Linear(f"{p}.mlp.proj", m.intermediate_size, h, m.num_experts)]
        if m.shared_intermediate_size:
            s = m.shared_intermediate_size
            out += [Linear(f"{p}.mlp.shared_expert.fc", h, 2 * s),
                    Linear(f"{p}.mlp.shared_expert.proj", s, h)]
        if m.shared_gate:
            out.append(Linear(f"{p}.mlp.shared_expert_gate", h, 1))
        return out

    def linears(self) -> list[Linear]:
        """Every linear, lm_head included when it is a tensor of its own."""
        out = [lin for i in range(self.num_layers) for lin in self.layer_linears(i)]
        if not self.tie_word_embeddings:
            out.append(Linear("lm_head", self.hidden_size, self.vocab_size))
        return out

    def quantizable(self) -> list[Linear]:
        """Linears a quantizer may touch (never the router or the shared-expert gate)."""
        return [lin for lin in self.linears()
                if not any(fnmatch.fnmatchcase(lin.name, p) for p in NEVER_QUANTIZED)]
