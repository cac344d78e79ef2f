"""The reference model runs our converted checkpoints exactly as transformers runs the source."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_NAMES

from trt_pipeline.reference.model import ReferenceModel, greedy


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_and_greedy_match_transformers(family, tiny_hf, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf[family], dtype=torch.float32).eval()
    ref = ReferenceModel.load(tiny_ckpt[family])
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ref.forward(ids)
    assert (got - expected).abs().max().item() < 1e-4
    hf_tokens = hf.generate(ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(greedy(ref, ids[:1], 32)[0], hf_tokens[0, ids.shape[1]:])


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_left_padded_batch_matches_unpadded_rows(family, tiny_ckpt):
    """Batching with left padding gives each row the logits it has alone (KV cache included)."""
    ref = ReferenceModel.load(tiny_ckpt[family])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 512, (1, 9), generator=g), torch.randint(0, 512, (1, 5), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    out = ref.forward(batch, valid=valid)
    assert (out[0] - ref.forward(a)[0]).abs().max() < 1e-4
    assert (out[1, 4:] - ref.forward(b)[0]).abs().max() < 1e-4
