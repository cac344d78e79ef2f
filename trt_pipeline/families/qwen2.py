"""Qwen2 / Qwen2.5 dense: LLaMA layout with q/k/v biases (QWenConfig attn_bias=True)."""

from .rules import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    MODEL_RULES,
    Family,
    dense_config,
    sliding_window_check,
)


def _config(hf: dict) -> dict:
    return dense_config(hf, "Qwen2ForCausalLM", attn_bias=True, qwen_type="qwen2",
                        seq_length=hf.get("max_position_embeddings", 2048))


FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + DENSE_MLP_RULES,
    backends=("onnx", "rtx", "trtllm"),
    check=sliding_window_check,
)
