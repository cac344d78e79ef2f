"""Our AWQ vs NVIDIA ModelOpt 0.47 `INT4_AWQ_CFG` (awq_lite) on the same model and calibration
tokens, side by side in one run: wall time, peak RSS and held-out perplexity of each result.

    python bench/bench_awq_modelopt.py [--model default|hunyuan-0.5b] [--samples 32 --seq-len 256]
        [--modelopt-python /work/modelopt-venv/bin/python]

ModelOpt runs in its own virtualenv (it needs transformers < 5.15 and `requests`):
    python3 -m venv /work/modelopt-venv
    /work/modelopt-venv/bin/pip install torch==2.13.0 nvidia-modelopt==0.47.0 \
        "transformers>=4.57,<5.15" accelerate requests
Both quantize the float32 model with symmetric INT4, group 128, lm_head kept in float; both
results are evaluated by fake-quantized float32 forward passes on the same held-out windows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from common import make_random_model, run_child

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "trt_pipeline" / "data" / "default_model"

TOKENS = """
import torch
from pathlib import Path
from trt_pipeline.quant.calib import calibration_ids
from trt_pipeline.textdata import eval_windows
src = Path({src!r})
vocab = {vocab}
data = "random" if not (src / "tokenizer.json").is_file() else "builtin"
calib = calibration_ids(data, src, vocab, {samples}, {seq_len}, seed=0)
held = eval_windows(data, src, vocab, {eval_tokens}, 256, key="eval")
torch.save({{"calib": calib, "held": held}}, {out!r})
result = {{"data": data}}
"""

OURS = """
import time, torch
from pathlib import Path
from trt_pipeline.families.apply import convert_checkpoint
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
from trt_pipeline.reference.model import ReferenceModel
work = Path({work!r})
convert_checkpoint(Path({src!r}), work / "fp32", "float32")
t0 = time.perf_counter()
m = quantize_checkpoint(work / "fp32", work / "awq", QuantParams(
    method="awq", calib_data={data!r}, samples={samples}, seq_len={seq_len}))
seconds = time.perf_counter() - t0
held = torch.load({tokens!r})["held"]
model = ReferenceModel.load(work / "awq")
nll = n = 0.0
for row in held:
    logits = model.forward(row[None])[0, :-1]
    nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
    n += len(row) - 1
result = dict(seconds=round(seconds, 2), nll=nll, n=n)
"""

MODELOPT = """
import time, torch
import modelopt.torch.quantization as mtq
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.float32).eval()
data = torch.load({tokens!r})
calib = data["calib"]
def loop(m):
    for row in calib:
        m(row[None])
t0 = time.perf_counter()
with torch.no_grad():
    mtq.quantize(model, mtq.INT4_AWQ_CFG, loop)
seconds = time.perf_counter() - t0
nll = n = 0.0
with torch.no_grad():
    for row in data["held"]:
        logits = model(row[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        n += len(row) - 1
result = dict(seconds=round(seconds, 2), nll=nll, n=n)
"""

FLOAT = """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.float32).eval()
nll = n = 0.0
with torch.no_grad():
    for row in torch.load({tokens!r})["held"]:
        logits = model(row[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        n += len(row) - 1
result = dict(nll=nll, n=n)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--modelopt-python", default="/work/modelopt-venv/bin/python")
    ap.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="awq-modelopt-")))
    args = ap.parse_args()
    src = DEFAULT_MODEL if args.model == "default" else make_random_model(
        args.model, Path("/tmp/trtp-bench") / f"{args.model}-hf", dtype="float32")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    tokens = args.work / "tokens.pt"
    data = run_child(TOKENS.format(src=str(src), vocab=vocab, samples=args.samples,
                                   seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                                   out=str(tokens)))["data"]
    fp = run_child(FLOAT.format(src=str(src), tokens=str(tokens)))
    ours = run_child(OURS.format(work=str(args.work), src=str(src), data=data,
                                 samples=args.samples, seq_len=args.seq_len, tokens=str(tokens)))
    mo = run_child(MODELOPT.format(src=str(src), tokens=str(tokens)),
                   python=args.modelopt_python)

    def ppl(r: dict) -> float:
        return math.exp(r["nll"] / r["n"])

    print(f"model {args.model}, calibration {args.samples} x {args.seq_len} ({data}), "
          f"held-out {fp['n']:.0f} tokens")
    print(f"{'':34} {'quantize s':>10} {'peak RSS MiB':>13} {'ppl':>9}")
    print(f"{'float32':34} {'':>10} {fp['peak_rss_mb']:13.0f} {ppl(fp):9.3f}")
    print(f"{'ModelOpt 0.47 INT4_AWQ_CFG':34} {mo['seconds']:10.1f} {mo['peak_rss_mb']:13.0f} "
          f"{ppl(mo):9.3f}")
    print(f"{'trt-pipeline awq (int4 g128)':34} {ours['seconds']:10.1f} "
          f"{ours['peak_rss_mb']:13.0f} {ppl(ours):9.3f}")
    print(f"speed-up {mo['seconds'] / ours['seconds']:.2f}x (target >= 2); "
          f"ppl ours/modelopt {ppl(ours) / ppl(mo):.4f} (target <= 1); "
          f"RSS ours/modelopt {ours['peak_rss_mb'] / mo['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
