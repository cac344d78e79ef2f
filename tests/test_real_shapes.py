"""Real models' shapes without their weights: the conversion plan of each published config yields
the tensor list and sizes that the facts' parameter arithmetic gives (benchmarking.md §7.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_pipeline.families import family_for
from trt_pipeline.families.apply import checkpoint_config, plan_jobs

CONFIGS = Path(__file__).parent / "data" / "configs"


class ShapeOnlySource:
    """An HF checkpoint's tensor listing (names and shapes, no data), as its safetensors headers
    would give it. Names follow the hub checkpoints (facts/hunyuan.md §3, trtllm.md §7)."""

    def __init__(self, cfg: dict) -> None:
        self.dir = Path("<listing>")
        self.shapes: dict[str, tuple[int, ...]] = {}
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or h // nq
        add = self.shapes.__setitem__
        add("model.embed_tokens.weight", (v, h))
        add("model.norm.weight", (h,))
        if not cfg["tie_word_embeddings"]:
            add("lm_head.weight", (v, h))
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            add(f"{p}.input_layernorm.weight", (h,))
            add(f"{p}.post_attention_layernorm.weight", (h,))
            for x, rows in (("q", nq * hd), ("k", nkv * hd), ("v", nkv * hd)):
                add(f"{p}.self_attn.{x}_proj.weight", (rows, h))
                if cfg["model_type"] in ("qwen2", "qwen2_moe"):
                    add(f"{p}.self_attn.{x}_proj.bias", (rows,))
            add(f"{p}.self_attn.o_proj.weight", (h, nq * hd))
            if cfg.get("use_qk_norm"):
                add(f"{p}.self_attn.query_layernorm.weight", (hd,))
                add(f"{p}.self_attn.key_layernorm.weight", (hd,))
            self._mlp(cfg, p)

    def _mlp(self, cfg: dict, p: str) -> None:
        add, h = self.shapes.__setitem__, cfg["hidden_size"]
        if cfg["model_type"] == "mixtral":
            add(f"{p}.block_sparse_moe.gate.weight", (cfg["num_local_experts"], h))
            for e in range(cfg["num_local_experts"]):
                q, i = f"{p}.block_sparse_moe.experts.{e}", cfg["intermediate_size"]
                add(f"{q}.w1.weight", (i, h))
                add(f"{q}.w3.weight", (i, h))
                add(f"{q}.w2.weight", (h, i))
        elif cfg["model_type"] == "qwen2_moe":
            add(f"{p}.mlp.gate.weight", (cfg["num_experts"], h))
            for name, i in [(f"experts.{e}", cfg["moe_intermediate_size"])
                            for e in range(cfg["num_experts"])] + [
                    ("shared_expert", cfg["shared_expert_intermediate_size"])]:
                add(f"{p}.mlp.{name}.gate_proj.weight", (i, h))
                add(f"{p}.mlp.{name}.up_proj.weight", (i, h))
                add(f"{p}.mlp.{name}.down_proj.weight", (h, i))
            add(f"{p}.mlp.shared_expert_gate.weight", (1, h))
        else:
            i = cfg["intermediate_size"]
            add(f"{p}.mlp.gate_proj.weight", (i, h))
            add(f"{p}.mlp.up_proj.weight", (i, h))
            add(f"{p}.mlp.down_proj.weight", (h, i))

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> str:
        return "BF16"


def jobs_for(model: str, dtype: str = "float16"):
    cfg = json.loads((CONFIGS / f"{model}.json").read_text())
    fam = family_for(cfg)
    ckpt_cfg = checkpoint_config(fam, cfg, dtype)
    return {j.target: j for j in plan_jobs(ShapeOnlySource(cfg), fam, ckpt_cfg)}, ckpt_cfg


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# (linears in decoder layers, embedding, total incl. norms/biases), from facts/benchmarking.md
# §7.2 (linears and embedding as printed there; norms and biases added here by hand).
@pytest.mark.parametrize("model,linears,embedding,norms_biases", [
    ("hunyuan-0.5b", 415_236_096, 123_717_632, 24 * (2 * 1024 + 2 * 128) + 1024),
    ("qwen2.5-0.5b", 357_826_560, 136_134_656, 24 * (2 * 896 + (14 + 4) * 64) + 896),
    ("llama-3.2-1b", 973_078_528, 262_668_288, 16 * 2 * 2048 + 2048),
])
def test_dense_parameter_counts_match_the_facts(model, linears, embedding, norms_biases):
    jobs, _ = jobs_for(model)
    layer_linears = sum(numel(j.spec.shape) for n, j in jobs.items()
                        if n.startswith("transformer.layers.") and n.endswith(".weight")
                        and "layernorm" not in n)
    assert layer_linears == linears
    assert numel(jobs["transformer.vocab_embedding.weight"].spec.shape) == embedding
    assert "lm_head.weight" not in jobs  # all three tie the head to the embedding
    total = sum(numel(j.spec.shape) for j in jobs.values())
    assert total == linears + embedding + norms_biases
    assert sum(j.spec.nbytes for j in jobs.values()) == 2 * total  # fp16


def test_hunyuan_real_shapes():
    jobs, cfg = jobs_for("hunyuan-0.5b")
    assert jobs["transformer.layers.0.attention.qkv.weight"].spec.shape == (4096, 1024)
    assert jobs["transformer.layers.0.attention.dense.weight"].spec.shape == (1024, 2048)
    assert jobs["transformer.layers.23.attention.q_layernorm.weight"].spec.shape == (128,)
    assert cfg["head_size"] == 128 and cfg["qk_layernorm"] is True
    assert cfg["trt_pipeline"]["qk_norm_position"] == "after_rope"
    assert cfg["rotary_base"] == pytest.approx(10000 * 1000 ** (128 / 126))  # ~1.11588e7
    assert cfg["rotary_base"] == pytest.approx(1.11588e7, rel=1e-5)


def test_llama3_rope_scaling_is_carried():
    _, cfg = jobs_for("llama-3.2-1b")
    assert cfg["rotary_base"] == 500000.0
    assert cfg["rotary_scaling"]["type"] == "llama3" and cfg["rotary_scaling"]["factor"] == 32.0


def test_mixtral_8x7b_expert_stacks_and_fp32_router():
    jobs, cfg = jobs_for("mixtral-8x7b")
    assert jobs["transformer.layers.31.mlp.fc.weight"].spec.shape == (8, 2 * 14336, 4096)
    assert jobs["transformer.layers.31.mlp.proj.weight"].spec.shape == (8, 4096, 14336)
    router = jobs["transformer.layers.0.mlp.router.weight"].spec
    assert router.shape == (8, 4096) and router.dtype == "float32"
    assert cfg["moe"]["num_experts"] == 8 and cfg["moe"]["top_k"] == 2
    assert cfg["moe"]["normalization_mode"] == 1 and cfg["hidden_act"] == "swiglu"
    total = sum(numel(j.spec.shape) for j in jobs.values())
    assert round(total / 1e9, 2) == 46.70  # Mixtral-8x7B's published 46.7 B parameters


def test_qwen15_moe_shared_expert_shapes():
    jobs, cfg = jobs_for("qwen1.5-moe-a2.7b")
    assert jobs["transformer.layers.0.mlp.fc.weight"].spec.shape == (60, 2 * 1408, 2048)
    assert jobs["transformer.layers.0.mlp.shared_expert.fc.weight"].spec.shape == (2 * 5632, 2048)
    assert jobs["transformer.layers.0.mlp.shared_expert_gate.weight"].spec.shape == (1, 2048)
    assert jobs["transformer.layers.0.attention.qkv.bias"].spec.shape == (3 * 2048,)
    assert cfg["moe"]["normalization_mode"] == 0 and cfg["moe"]["top_k"] == 4
    assert cfg["moe_intermediate_size"] == 1408
    total = sum(numel(j.spec.shape) for j in jobs.values())
    assert round(total / 1e9, 1) == 14.3  # Qwen1.5-MoE-A2.7B: 14.3 B parameters in total
