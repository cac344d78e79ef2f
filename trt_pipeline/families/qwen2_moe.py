"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): routed experts plus a shared expert behind a sigmoid gate.

facts/trtllm.md §6-§7, §10: QWen class, normalization NONE unless norm_topk_prob (softmax over all
experts, top-k); shared_expert.fc = concat([up, gate]); shared_expert_gate [1, H] in model dtype.
"""

from ..checkpoint.desc import EXTRA
from .rules import (
    ATTENTION_RULES,
    MODEL_RULES,
    Family,
    L,
    R,
    T,
    dense_config,
    moe_config,
    sliding_window_check,
)


def _config(hf: dict) -> dict:
    shared = hf.get("shared_expert_intermediate_size", 0)
    return dense_config(
        hf, "Qwen2MoeForCausalLM", attn_bias=bool(hf.get("qkv_bias", True)), hidden_act="swiglu",
        qwen_type="qwen2_moe", seq_length=hf.get("max_position_embeddings", 2048),
        moe_intermediate_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared,
        moe=moe_config(hf["num_experts"], hf["num_experts_per_tok"],
                       bool(hf.get("norm_topk_prob", False)), shared),
        **{EXTRA: {"shared_expert_gate": True}},
    )


def _check(hf: dict) -> list[str]:
    out = sliding_window_check(hf)
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        out.append("dense layers between MoE layers (mlp_only_layers, decoder_sparse_step) "
                   "are not supported")
    return out


E = f"{L}.mlp.experts.{{e}}"
S = f"{L}.mlp.shared_expert"
FAMILY = Family(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + (
        R(f"{T}.mlp.router.weight", f"{L}.mlp.gate.weight", dtype="float32"),
        R(f"{T}.mlp.fc.weight", f"{E}.up_proj.weight", f"{E}.gate_proj.weight", per_expert=True),
        R(f"{T}.mlp.proj.weight", f"{E}.down_proj.weight", per_expert=True),
        R(f"{T}.mlp.shared_expert.fc.weight", f"{S}.up_proj.weight", f"{S}.gate_proj.weight"),
        R(f"{T}.mlp.shared_expert.proj.weight", f"{S}.down_proj.weight"),
        R(f"{T}.mlp.shared_expert_gate.weight", f"{L}.mlp.shared_expert_gate.weight"),
    ),
    backends=("onnx", "rtx", "trtllm"),
    moe=True,
    check=_check,
)
