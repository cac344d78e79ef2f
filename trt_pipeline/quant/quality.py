"""Quantization quality: perplexity and top-1 agreement of a quantized checkpoint against its float
source on held-out text, both executed by the reference model (which computes with exactly the
dequantized weights the engines use)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..reference.model import ReferenceModel
from ..textdata import eval_windows

BATCH = 4  # windows per forward: bounds the [B, S, vocab] logits held at once


@torch.no_grad()
def evaluate(float_ckpt: Path, quant_ckpt: Path, text: str = "builtin", tokens: int = 1024,
             seq_len: int = 256) -> dict[str, float]:
    """{"ppl_float", "ppl_quant", "ppl_ratio", "top1_agreement", "tokens"}: next-token perplexity
    of each model and how often their argmax agrees, over `tokens` held-out positions."""
    ref = ReferenceModel.load(Path(float_ckpt))
    quant = ReferenceModel.load(Path(quant_ckpt))
    seq_len = min(seq_len, tokens, ref.desc.max_position_embeddings)
    ids = eval_windows(text, Path(float_ckpt), ref.desc.vocab_size, tokens, seq_len,
                       key="quantize.gate.text")
    nll_f = nll_q = 0.0
    agree = count = 0
    for batch in ids.split(BATCH):
        target = batch[:, 1:].reshape(-1)
        lf = ref.forward(batch)[:, :-1].reshape(target.numel(), -1)
        lq = quant.forward(batch)[:, :-1].reshape(target.numel(), -1)
        nll_f += float(F.cross_entropy(lf, target, reduction="sum"))
        nll_q += float(F.cross_entropy(lq, target, reduction="sum"))
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        count += target.numel()
    ppl_f, ppl_q = math.exp(nll_f / count), math.exp(nll_q / count)
    return {"ppl_float": ppl_f, "ppl_quant": ppl_q, "ppl_ratio": ppl_q / ppl_f,
            "top1_agreement": agree / count, "tokens": count}
