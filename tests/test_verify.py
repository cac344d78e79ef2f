"""`verify`: an artifact against its Hugging Face source, with transformers as the oracle."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import DEFAULT_MODEL

from trt_pipeline.errors import BadInput
from trt_pipeline.families.apply import convert_checkpoint
from trt_pipeline.verify import verify


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "ckpt"
    convert_checkpoint(DEFAULT_MODEL, out, "float16")
    return out


def test_checkpoint_matches_its_source(fp16_ckpt):
    r = verify(fp16_ckpt, DEFAULT_MODEL, tokens=256, window=64)
    assert r.tokens == 256 and r.windows == 4 and r.runtime == "reference"
    assert r.max_abs_diff < 1e-4 and r.top1_agreement == 1.0
    assert math.isclose(r.ppl_artifact, r.ppl_hf, rel_tol=1e-5)
    assert r.ppl_hf < 60  # the trained model on held-out Shakespeare (about 32)


def test_wrong_source_is_refused(fp16_ckpt, tiny_hf):
    with pytest.raises(BadInput, match="not its source"):
        verify(fp16_ckpt, tiny_hf["llama"], tokens=64, window=32)


def test_cli_json(fp16_ckpt):
    res = subprocess.run([sys.executable, "-m", "trt_pipeline.cli", "verify", str(fp16_ckpt),
                          "--against", str(DEFAULT_MODEL), "--tokens", "64", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {"max_abs_diff", "top1_agreement", "ppl_artifact", "ppl_hf"} <= set(report)
