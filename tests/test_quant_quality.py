"""Quantized vs float on the trained default model (LLaMA, hidden 128, Shakespeare): perplexity and
top-1 agreement on held-out text, executed by the reference model. Every linear has in-width 128
or 384, so all of them quantize at group 128."""

from __future__ import annotations

from pathlib import Path

import pytest

from trt_pipeline.quant.quality import evaluate
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "trt_pipeline" / "data" / "default_model"


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    from trt_pipeline.families.apply import convert_checkpoint

    out = tmp_path_factory.mktemp("default") / "float32"
    convert_checkpoint(DEFAULT_MODEL, out, "float32")
    return out


def test_awq_and_rtn_perplexity_on_heldout_text(float_ckpt, tmp_path):
    runs = {
        "rtn int4 g128": QuantParams(method="rtn", group_size=128),
        "awq int4 g128": QuantParams(method="awq", group_size=128),  # builtin text, 32 x 256
        "rtn int8 chan": QuantParams(method="rtn", bits=8, group_size=-1),
    }
    rows = {}
    for name, params in runs.items():
        out = tmp_path / name.replace(" ", "_")
        metrics = quantize_checkpoint(float_ckpt, out, params)
        rows[name] = {**evaluate(float_ckpt, out, "builtin", tokens=1024),
                      "seconds": metrics["seconds"]}
    first = next(iter(rows.values()))
    print(f"\nheld-out perplexity, {first['tokens']} tokens (trt_pipeline/data/heldout.txt)")
    print(f"{'float32':14s} ppl {first['ppl_float']:8.3f}")
    for name, r in rows.items():
        print(f"{name:14s} ppl {r['ppl_quant']:8.3f}  ratio {r['ppl_ratio']:.4f}  "
              f"top1 {r['top1_agreement']:.3f}  quantize {r['seconds']:.1f} s")
    awq, rtn = rows["awq int4 g128"], rows["rtn int4 g128"]
    assert awq["ppl_quant"] <= rtn["ppl_quant"] * 1.02
    assert awq["ppl_ratio"] < 1.25
    assert awq["top1_agreement"] >= 0.8
    assert rtn["top1_agreement"] >= 0.8
    assert rows["rtn int8 chan"]["ppl_ratio"] < 1.01
    assert rows["rtn int8 chan"]["top1_agreement"] >= 0.97
