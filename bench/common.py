"""Shared by the benchmark scripts: random-weight models at real shapes, child-process timing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "configs"


def make_random_model(name: str, out: Path, dtype: str = "bfloat16", layers: int | None = None
                      ) -> Path:
    """A published config (tests/data/configs/<name>.json) with random weights, saved as an HF
    directory. Reused when it already exists."""
    if (out / "config.json").is_file():
        return out
    code = f"""
import json, torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = json.load(open({str(CONFIGS / (name + '.json'))!r}))
if {layers!r}: cfg["num_hidden_layers"] = {layers!r}
arch_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
torch.manual_seed(0)
with torch.device("cpu"):
    model = AutoModelForCausalLM.from_config(arch_cfg, dtype=getattr(torch, {dtype!r}))
model.save_pretrained({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def run_child(code: str, python: str = sys.executable) -> dict:
    """Run Python `code` (which leaves its figures in a dict named `result`) in a fresh process;
    returns them plus wall seconds and the child's own peak RSS."""
    tail = ("\nimport json as _j, resource as _r\n"
            "result['peak_rss_mb'] = round(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss / 1024, 1)\n"
            "print(_j.dumps(result))\n")
    t0 = time.perf_counter()
    res = subprocess.run([python, "-c", code + tail], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 2)
    return out
