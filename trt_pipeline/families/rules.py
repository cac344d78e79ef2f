"""Family and WeightRule, the shared config/weight tables, and the one engine that applies them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadInput, Problem

HFConfig = dict[str, Any]
CkptConfig = dict[str, Any]


@dataclass(frozen=True, slots=True)
class WeightRule:
    """One checkpoint tensor from one or more HF tensors, concatenated along dim 0.

    Templates use {i} for the layer and {e} for the expert; `per_expert` stacks the concatenation
    over experts along a new leading dim. `when` reads the checkpoint config (e.g. attn_bias)."""

    target: str
    sources: tuple[str, ...]
    per_expert: bool = False
    dtype: str | None = None
    when: Callable[[CkptConfig], bool] | None = None

    def applies(self, cfg: CkptConfig) -> bool:
        return self.when is None or self.when(cfg)


@dataclass(frozen=True, slots=True)
class Family:
    """A model family as data: detection keys, config mapping, weight rules, what can build it."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    make_config: Callable[[HFConfig], CkptConfig]
    model_rules: tuple[WeightRule, ...]
    layer_rules: tuple[WeightRule, ...]
    backends: tuple[str, ...]
    moe: bool = False
    backend_notes: dict[str, str] = field(default_factory=dict)
    check: Callable[[HFConfig], list[str]] = lambda _hf: []


def R(target: str, *sources: str, **kw: Any) -> WeightRule:  # noqa: N802 - table shorthand
    return WeightRule(target, sources, **kw)


def _attn_bias(cfg: CkptConfig) -> bool:
    return bool(cfg.get("attn_bias"))


def _untied(cfg: CkptConfig) -> bool:
    return not cfg.get("tie_word_embeddings")


L = "model.layers.{i}"
T = "transformer.layers.{i}"

# facts/trtllm.md §7: vocab_embedding <- embed_tokens, ln_f <- norm; lm_head absent when tied.
MODEL_RULES = (
    R("transformer.vocab_embedding.weight", "model.embed_tokens.weight"),
    R("transformer.ln_f.weight", "model.norm.weight"),
    R("lm_head.weight", "lm_head.weight", when=_untied),
)
ATTENTION_RULES = (
    R(f"{T}.input_layernorm.weight", f"{L}.input_layernorm.weight"),
    R(f"{T}.post_layernorm.weight", f"{L}.post_attention_layernorm.weight"),
    R(f"{T}.attention.qkv.weight", *(f"{L}.self_attn.{x}_proj.weight" for x in "qkv")),
    R(f"{T}.attention.qkv.bias", *(f"{L}.self_attn.{x}_proj.bias" for x in "qkv"),
      when=_attn_bias),
    R(f"{T}.attention.dense.weight", f"{L}.self_attn.o_proj.weight"),
)
# Dense naming: fc <- gate_proj (activated), gate <- up_proj (linear).
DENSE_MLP_RULES = (
    R(f"{T}.mlp.fc.weight", f"{L}.mlp.gate_proj.weight"),
    R(f"{T}.mlp.gate.weight", f"{L}.mlp.up_proj.weight"),
    R(f"{T}.mlp.proj.weight", f"{L}.mlp.down_proj.weight"),
)


def qk_norm_rules(q_name: str, k_name: str) -> tuple[WeightRule, ...]:
    return (
        R(f"{T}.attention.q_layernorm.weight", f"{L}.self_attn.{q_name}.weight"),
        R(f"{T}.attention.k_layernorm.weight", f"{L}.self_attn.{k_name}.weight"),
    )


def rope(hf: HFConfig) -> tuple[float, dict[str, Any] | None]:
    """(rotary_base, rotary_scaling) from either transformers 4 (rope_theta/rope_scaling) or
    transformers 5 (rope_parameters) spelling. Only scalings every backend implements pass."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    base = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return base, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return base, {"type": "llama3", "rope_type": "llama3", **{k: scaling[k] for k in keys}}
    if kind == "linear":
        return base, {"type": "linear", "rope_type": "linear", "factor": float(scaling["factor"])}
    raise BadInput([Problem("model.source", f"rope scaling {kind!r} is not supported",
                            "Supported: default, linear, llama3 (and HunYuan's fixed alpha).")])


# config.json fields the families read, by what they must hold; the first five every family needs.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size")
_POSITIVE_INT = "a positive integer"
FIELD_KINDS: dict[str, str] = {
    **dict.fromkeys(REQUIRED_FIELDS, _POSITIVE_INT),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "attention_head_dim",
                     "max_position_embeddings", "moe_intermediate_size", "num_experts",
                     "num_local_experts", "num_experts_per_tok"), _POSITIVE_INT),
    "shared_expert_intermediate_size": "an integer >= 0",
    "rms_norm_eps": "a positive number",
    "rope_theta": "a positive number",
    "rope_scaling": "a mapping or null",
    "rope_parameters": "a mapping or null",
}
NULLABLE = {"num_key_value_heads", "head_dim", "attention_head_dim", "rope_theta"}  # read with `or`


def _fits(value: Any, kind: str) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _POSITIVE_INT:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if kind == "an integer >= 0":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "a positive number":
        return number and value > 0
    return value is None or isinstance(value, dict)


def config_problems(hf: HFConfig) -> list[str]:
    """What is missing or mistyped among the config.json fields the families read: checked
    before any family maps the config, so a broken config.json is a message, not a KeyError."""
    out = [f"config.json has no {k}; expected {FIELD_KINDS[k]}"
           for k in REQUIRED_FIELDS if k not in hf]
    out += [f"config.json {k}: got {v!r} ({type(v).__name__}); expected {FIELD_KINDS[k]}"
            for k, v in hf.items() if k in FIELD_KINDS and not _fits(v, FIELD_KINDS[k])
            and not (v is None and k in NULLABLE)]
    return out


def head_dim(hf: HFConfig) -> int:
    return int(hf.get("head_dim") or hf.get("attention_head_dim")
               or hf["hidden_size"] // hf["num_attention_heads"])


def dense_config(hf: HFConfig, architecture: str, **extra: Any) -> CkptConfig:
    """The TensorRT-LLM PretrainedConfig/LLaMAConfig fields shared by our decoder families."""
    base, scaling = rope(hf)
    heads = hf["num_attention_heads"]
    hd = head_dim(hf)
    cfg: CkptConfig = {
        "architecture": architecture,
        "logits_dtype": "float32",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_size": hd,
        "intermediate_size": hf["intermediate_size"],
        "hidden_act": "silu",
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rotary_embedding_dim": hd,
        "rotary_base": base,
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "qk_layernorm": False,
        "attn_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    cfg.update(extra)
    return cfg


def moe_config(num_experts: int, top_k: int, renormalize: bool, shared: int = 0) -> dict[str, Any]:
    """MoeConfig as serialized by TensorRT-LLM 1.2.1 (facts/trtllm.md §10)."""
    return {
        "num_experts": num_experts,
        "shared_expert_intermediate_size": shared,
        "top_k": top_k,
        "normalization_mode": 1 if renormalize else 0,
        "sparse_mixer_epsilon": 0.01,
        "tp_mode": 0,
        "device_limited_n_group": 0,
        "device_limited_topk_group": 0,
        "device_limited_routed_scaling_factor": 1.0,
    }


def sliding_window_check(hf: HFConfig) -> list[str]:
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and hf.get("model_type")
                                        == "mixtral"):
        return ["sliding-window attention is not supported (full attention only)"]
    return []
