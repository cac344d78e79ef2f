"""HunYuan dense (Hunyuan-0.5B/1.8B/4B/7B): QK RMSNorm *after* RoPE, alpha RoPE, tied embeddings.

facts/hunyuan.md §4-5: base = rope_theta * alpha^(head_dim/(head_dim-2)) is a fixed RoPE base;
query/key_layernorm run after the rotation, which TensorRT-LLM's qk_layernorm (before RoPE) is not,
so the position is recorded in our own config section. TensorRT-LLM 1.2.1 has no engine model
class for HunYuan (facts/trtllm.md §11): the rtx and onnx backends build it.
"""

from ..checkpoint.desc import EXTRA
from .rules import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    MODEL_RULES,
    Family,
    dense_config,
    head_dim,
    qk_norm_rules,
)


def _rope_alpha(hf: dict) -> float | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return scaling.get("alpha")


def _config(hf: dict) -> dict:
    alpha = _rope_alpha(hf)
    plain = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_parameters")}
    params = hf.get("rope_parameters") or {}
    plain["rope_theta"] = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    cfg = dense_config(plain, "HunYuanDenseV1ForCausalLM",
                       qk_layernorm=bool(hf.get("use_qk_norm", False)))
    if alpha:
        hd = head_dim(hf)
        cfg["rotary_base"] = cfg["rotary_base"] * float(alpha) ** (hd / (hd - 2))
    cfg[EXTRA] = {"qk_norm_position": "after_rope", "rope_alpha": alpha}
    return cfg


def _check(hf: dict) -> list[str]:
    out = []
    if hf.get("use_cla"):
        out.append("cross-layer attention (use_cla) is not supported")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind not in ("default", "dynamic") or (kind == "dynamic" and not scaling.get("alpha")):
        out.append(f"rope scaling {kind!r} without alpha is not supported")
    return out


FAMILY = Family(
    name="hunyuan",
    architectures=("HunYuanDenseV1ForCausalLM",),
    model_types=("hunyuan_v1_dense",),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + qk_norm_rules("query_layernorm", "key_layernorm")
    + DENSE_MLP_RULES,
    backends=("onnx", "rtx"),
    backend_notes={"trtllm": "TensorRT-LLM 1.2.1 has no engine model class for HunYuan (its "
                   "QK norm runs after RoPE); use build.backend=rtx"},
    check=_check,
)
