"""LLaMA (Llama-3.x, Llama-2, Mistral-shaped dense): the base decoder family."""

from .rules import ATTENTION_RULES, DENSE_MLP_RULES, MODEL_RULES, Family, dense_config


def _config(hf: dict) -> dict:
    return dense_config(hf, "LlamaForCausalLM")


FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "mistral"),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + DENSE_MLP_RULES,
    backends=("onnx", "rtx", "trtllm"),
)
