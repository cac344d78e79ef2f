"""Mixtral (MoE, top-2, renormalized): LLaMA attention, experts stacked, router kept in fp32.

facts/trtllm.md §7: mlp.fc = concat([w3 (up), w1 (gate)]) per expert, stacked [E, 2I, H];
mlp.proj = w2 stacked [E, H, I]; mlp.router [E, H] float32. hidden_act swiglu for MoE.
"""

from .rules import ATTENTION_RULES, MODEL_RULES, Family, L, R, T, dense_config, moe_config


def _config(hf: dict) -> dict:
    return dense_config(hf, "MixtralForCausalLM", hidden_act="swiglu",
                        moe=moe_config(hf["num_local_experts"], hf["num_experts_per_tok"], True))


def _check(hf: dict) -> list[str]:
    return ["sliding-window attention is not supported"] if hf.get("sliding_window") else []


E = f"{L}.block_sparse_moe.experts.{{e}}"
FAMILY = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + (
        R(f"{T}.mlp.router.weight", f"{L}.block_sparse_moe.gate.weight", dtype="float32"),
        R(f"{T}.mlp.fc.weight", f"{E}.w3.weight", f"{E}.w1.weight", per_expert=True),
        R(f"{T}.mlp.proj.weight", f"{E}.w2.weight", per_expert=True),
    ),
    backends=("onnx", "rtx", "trtllm"),
    moe=True,
    check=_check,
)
