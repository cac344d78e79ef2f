"""INT4 decode and prefill of a Hunyuan-0.5B-shape model (random weights) on this machine's CPUs:
our ONNX graph in ONNX Runtime beside onnxruntime-genai's own INT4 model of the same weights, the
CPU reference model and transformers, against the memory-bandwidth ceiling measured in the same run.

    python bench/bench_onnx.py [--work /tmp/trtp-bench-onnx] [--reuse /tmp/trtp-bench-awq]
        [--method awq|rtn] [--rounds 5] [--prompt 128] [--new 64] [--slow-new 8]
        [--genai-python /work/genai-venv/bin/python]
    python bench/bench_onnx.py --accuracy     # level 4 vs 1, INT4 vs float head: default model

onnxruntime-genai lives in its own venv, never in the project's:
    python3 -m venv /work/genai-venv && /work/genai-venv/bin/pip install onnxruntime-genai==0.18.0 \
        onnx_ir
    (plus a .pth line naming /work/venv's site-packages, for the torch and transformers its model
    builder imports; its own onnxruntime comes first on the path.)

Each engine runs in a worker process of its own, loaded once; every round asks each in turn for
one greedy generation (prompt of --prompt seeded random ids, then --new tokens; the reference and
transformers, ~20x slower, --slow-new), and numpy measures memory bandwidth between rounds
(single thread: read-only int64 sum, and STREAM-style copy counting bytes read + written; copy on
two threads too). The machine is shared: figures are medians over rounds, with the load average
printed. Weights read per token are counted from each graph's initializers (a Gather'd table: one
row; INT4 half a byte); the ceiling is copy bandwidth / those bytes, and the last column uses the
read-only figure instead.

The INT4 lm_head of "ours" is the quantizer's to write (a tied model keeps its embedding in
float); until it does for tied models, this script adds it to the quantized checkpoint itself
(round-to-nearest, group 128, the way genai's builder quantizes its head) and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import make_random_model, run_child

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "trt_pipeline" / "data" / "default_model"  # genai's builder insists on one


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """HF dir, float16 and INT4 checkpoints (reused from --reuse or --work), INT4-head variant,
    our two float32 graphs and genai's two models."""
    w, reuse = args.work, args.reuse
    w.mkdir(parents=True, exist_ok=True)
    hf = reuse / "hunyuan-0.5b-hf" if (reuse / "hunyuan-0.5b-hf/config.json").is_file() else \
        make_random_model("hunyuan-0.5b", w / "hunyuan-0.5b-hf")
    fp16 = reuse / "hunyuan-0.5b-fp16" if (reuse / "hunyuan-0.5b-fp16/config.json").is_file() \
        else w / "hunyuan-0.5b-fp16"
    int4 = (reuse / "hunyuan-0.5b-int4-awq" if args.method == "awq" and
            (reuse / "hunyuan-0.5b-int4-awq/config.json").is_file()
            else w / f"hunyuan-0.5b-int4-{args.method}")
    head, flo = w / "int4-head", w / "onnx-float-head"
    steps = [(fp16, CONVERT, hf), (int4, QUANTIZE, fp16), (head, INT4_HEAD, int4),
             (flo, LOWER, int4), (w / "onnx-int4-head", LOWER, head)]
    for out, code, src in steps:
        if not any(out.glob("*.json")) and not (out / "model.onnx").is_file():
            print(f"making {out}", file=sys.stderr)
            made = run_child(code.format(src=str(src), out=str(out), method=args.method))
            print(f"  {json.dumps(made)[:300]}", file=sys.stderr)
    shadow = w / "hf-with-tokenizer"  # the HF dir plus tokenizer files, for genai's builder
    shadow.mkdir(exist_ok=True)
    for f in [*hf.iterdir(), *TOKENIZER.glob("tokenizer*")]:
        if not (shadow / f.name).exists():
            (shadow / f.name).symlink_to(f.resolve())
    paths = {"hf": hf, "int4": int4, "int4_head": head, "onnx_float_head": flo,
             "onnx_int4_head": w / "onnx-int4-head"}
    for name, extra in (("genai_b128", ["--extra_options", "block_size=128"]), ("genai_b32", [])):
        out = paths[name] = w / name.replace("_", "-")
        if not (out / "genai_config.json").is_file():
            cmd = [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(shadow),
                   "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(w / "genai-cache"), *extra]
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return paths


CONVERT = """
from pathlib import Path
from trt_pipeline.families.apply import convert_checkpoint
result = dict(parameters=convert_checkpoint(Path({src!r}), Path({out!r}), "float16")["parameters"])
"""
QUANTIZE = """
from pathlib import Path
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
m = quantize_checkpoint(Path({src!r}), Path({out!r}), QuantParams(
    method={method!r}, bits=4, group_size=128, calib_data="random", samples=32, seq_len=256))
result = dict(seconds=m["seconds"])
"""
INT4_HEAD = """
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from trt_pipeline.checkpoint.desc import ModelDesc
from trt_pipeline.checkpoint.io import read_config, write_config
from trt_pipeline.quant.pack import linear_tensors
src, out = Path({src!r}), Path({out!r})
t = load_file(str(src / "rank0.safetensors"))
result = dict(added="lm_head.weight" not in t)
if result["added"]:  # the quantizer wrote no head of its own: add the one it would
    cfg = read_config(src)
    cfg["quantization"]["exclude_modules"] = [
        m for m in cfg["quantization"]["exclude_modules"] if m != "lm_head"]
    table = t["transformer.vocab_embedding.weight"]
    t.update(linear_tensors("lm_head", table.float(), ModelDesc.from_config(cfg).quant,
                            table.dtype))
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(t, str(tmp / "rank0.safetensors"))
    for f in src.iterdir():
        if f.name not in ("rank0.safetensors", "config.json"):
            shutil.copy2(f, tmp / f.name)
    write_config(tmp, cfg)
    tmp.rename(out)
else:
    out.symlink_to(src.resolve())
"""
LOWER = """
from pathlib import Path
from trt_pipeline.backends.onnx.lower import lower_checkpoint
result = lower_checkpoint(Path({src!r}), Path({out!r}), "float32")
"""
# One engine per process (argv: kind, path, options JSON). Prints {"load_s", "bytes_per_token"},
# then per stdin line {"prompt": ids, "new": n}: {"prefill_s", "steps_s", "tokens"} (greedy).
WORKER = r"""
import json, sys, time
import numpy as np
kind, path, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def graph_bytes(model_file):
    # weights read per token: a table only Gather'd (or a RoPE cache) gives one row, else all
    import onnx
    from onnx import TensorProto
    from onnx.helper import tensor_dtype_to_np_dtype
    g = onnx.load(model_file, load_external_data=False).graph
    use = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            use.setdefault(i, set()).add("row" if n.op_type.startswith("Gather") or
                                         (n.op_type == "RotaryEmbedding" and k > 0) else "all")
    total = 0
    for t in g.initializer:
        numel = int(np.prod(t.dims)) if t.dims else 1
        size = numel / 2 if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else (
            numel * tensor_dtype_to_np_dtype(t.data_type).itemsize)
        total += size if "all" in use.get(t.name, {"all"}) else size / t.dims[0]
    return total

def timed(start, step):
    def generate(ids, new):  # greedy: prefill, then one token per step
        t = time.perf_counter()
        state, tok = start(ids)
        prefill, steps, tokens = time.perf_counter() - t, [], [int(tok)]
        for _ in range(new - 1):
            t = time.perf_counter()
            tok = step(state, tok)
            steps.append(time.perf_counter() - t)
            tokens.append(int(tok))
        return prefill, steps, tokens
    return generate

t0 = time.perf_counter()
if kind == "onnx":
    from trt_pipeline.backends.onnx.runtime import OnnxKVCache, OnnxModel
    m = OnnxModel.load(path, threads=opts.get("threads"), accuracy_level=opts["level"])
    nbytes = graph_bytes(path + "/model.onnx")
    def start(ids):
        cache = OnnxKVCache()
        return cache, m.forward(np.array([ids]), cache, last_only=True)[0, -1].argmax()
    generate = timed(start, lambda cache, tok: m.forward(
        np.array([[tok]]), cache, last_only=True)[0, -1].argmax())
elif kind == "genai":
    import onnxruntime_genai as og
    m = og.Model(path)
    nbytes = graph_bytes(path + "/model.onnx")
    def step(gen, tok):
        gen.generate_next_token()
        return gen.get_next_tokens()[0]
    def generate(ids, new):  # its KV buffer is max_length long: exactly what the call needs
        def start(ids):
            p = og.GeneratorParams(m)
            p.set_search_options(max_length=len(ids) + new, do_sample=False)
            gen = og.Generator(m, p)
            gen.append_tokens(np.array(ids, dtype=np.int32))
            return gen, gen.get_next_tokens()[0]
        return timed(start, step)(ids, new)
elif kind == "reference":
    import torch
    from trt_pipeline.reference.model import KVCache, ReferenceModel
    m = ReferenceModel.load(path)
    table = m.w["transformer.vocab_embedding.weight"]  # read whole only as a tied head
    nbytes = sum(t.numel() * t.element_size() for t in m.w.values())
    if "lm_head.weight" in m.w or not m.desc.tie_word_embeddings:
        nbytes -= table.numel() * table.element_size()
    def start(ids):
        cache = KVCache()
        return cache, int(m.forward(torch.tensor([ids]), cache)[0, -1].argmax())
    generate = timed(start, lambda cache, tok: int(
        m.forward(torch.tensor([[tok]]), cache)[0, -1].argmax()))
else:  # transformers generate(), each new token timed by a streamer
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nbytes = sum(p.numel() * 4 for p in m.parameters())  # a tied table once, read as the head
    if not m.config.tie_word_embeddings:
        nbytes -= m.get_input_embeddings().weight.numel() * 4
    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []
        def put(self, value):
            self.times.append(time.perf_counter())
        def end(self):
            pass
    def generate(ids, new):
        clock = Clock()
        t = time.perf_counter()
        out = m.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, streamer=clock)
        ts = clock.times[1:]  # the first put() is the prompt
        return ts[0] - t, list(np.diff(ts)), out[0, len(ids):].tolist()
print(json.dumps({"load_s": time.perf_counter() - t0, "bytes_per_token": nbytes}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    prefill, steps, tokens = generate(cmd["prompt"], cmd["new"])
    print(json.dumps({"prefill_s": prefill, "steps_s": [float(x) for x in steps],
                      "tokens": [int(x) for x in tokens]}), flush=True)
"""


def bandwidth() -> dict[str, float]:
    """GB/s on 512 MiB of numpy: read-only (int64 sum, one thread), copy counting bytes read +
    written (one thread; and two threads on halves: np.copyto releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(128 << 20, dtype=np.float32)
    b = np.empty_like(a)
    half = a.size // 2
    best = {"read": 0.0, "copy": 0.0, "copy_2_threads": 0.0}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for key, run in (("read", lambda: np.add.reduce(a.view(np.int64))),
                             ("copy", lambda: np.copyto(b, a)),
                             ("copy_2_threads", lambda: list(pool.map(
                                 lambda k: np.copyto(b[k:k + half], a[k:k + half]),
                                 (0, half))))):
                t = time.perf_counter()
                run()
                moved = a.nbytes * (1 if key == "read" else 2)
                best[key] = max(best[key], moved / (time.perf_counter() - t) / 1e9)
    return best


class Worker:
    """One engine in its own process: `run` = one timed greedy generation."""

    def __init__(self, name: str, python: str, kind: str, path: Path, opts: dict,
                 log: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen([python, "-c", WORKER, kind, str(path), json.dumps(opts)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.info = self._read(log)

    def _read(self, log: Path) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died; see {log}:\n{log.read_text()[-2000:]}")
        return json.loads(line)

    def run(self, prompt: list[int], new: int, log: Path) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read(log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def rows(args: argparse.Namespace, p: dict[str, Path]) -> list[tuple]:
    """(label, python, worker kind, path, options, new tokens)."""
    py, gpy = sys.executable, args.genai_python
    return [
        ("ours: INT4 head, level 4", py, "onnx", p["onnx_int4_head"], {"level": 4}, args.new),
        ("ours: INT4 head, level 4, 1 thread", py, "onnx", p["onnx_int4_head"],
         {"level": 4, "threads": 1}, args.new),
        ("ours: float head, level 4", py, "onnx", p["onnx_float_head"], {"level": 4}, args.new),
        ("ours: INT4 head, level 1", py, "onnx", p["onnx_int4_head"], {"level": 1},
         args.slow_new),
        ("genai 0.18 int4, block 128", gpy, "genai", p["genai_b128"], {}, args.new),
        ("genai 0.18 int4, default (32)", gpy, "genai", p["genai_b32"], {}, args.new),
        ("reference (CPU, INT4-head ckpt)", py, "reference", p["int4_head"], {}, args.slow_new),
        ("transformers float32", py, "transformers", p["hf"], {}, args.slow_new),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench-onnx"))
    ap.add_argument("--reuse", type=Path, default=Path("/tmp/trtp-bench-awq"),
                    help="bench_awq.py's work dir: its HF dir and checkpoints when present")
    ap.add_argument("--method", choices=("awq", "rtn"), default="awq")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--slow-new", type=int, default=8)
    ap.add_argument("--genai-python", default="/work/genai-venv/bin/python")
    ap.add_argument("--accuracy", action="store_true",
                    help="only the accuracy of level 4 and of an INT4 head on the default model")
    args = ap.parse_args()
    if args.accuracy:
        accuracy(args.work / "default-model")
        return
    paths = prepare(args)
    prompt = np.random.default_rng(0).integers(3, 1000, args.prompt).tolist()
    load0 = os.getloadavg()
    workers = []
    for label, py, kind, path, opts, new in rows(args, paths):
        log = args.work / f"worker-{len(workers)}.log"
        workers.append((Worker(label, py, kind, path, opts, log), new, log))
    results: dict[str, list[dict]] = {w.name: [] for w, _, _ in workers}
    bw = [bandwidth()]
    for r in range(args.rounds):
        for w, new, log in workers:
            time.sleep(0.5)  # let the last engine's spinning threads (ORT, OpenMP) go idle
            results[w.name].append(w.run(prompt, new, log))
        bw.append(bandwidth())
        print(f"round {r + 1}/{args.rounds}: load average {os.getloadavg()[0]:.2f}",
              file=sys.stderr)
    for w, _, _ in workers:
        w.close()
    report(workers, results, bw, load0, args)


def report(workers: list, results: dict, bw: list[dict], load0: tuple, args) -> None:
    copy = statistics.median(b["copy"] for b in bw)
    read = statistics.median(b["read"] for b in bw)
    copy2 = statistics.median(b["copy_2_threads"] for b in bw)
    table = {}
    for w, _, _ in workers:
        runs = results[w.name]
        step = statistics.median(s for r in runs for s in r["steps_s"][1:])
        table[w.name] = {"decode_tok_s": 1 / step, "prefill_ms": 1e3 * statistics.median(
            r["prefill_s"] for r in runs), "mb_per_token": w.info["bytes_per_token"] / 1e6,
            "load_s": w.info["load_s"], "tokens": runs[-1]["tokens"][:8]}
    anchor = table["genai 0.18 int4, block 128"]["decode_tok_s"]
    head_by = ("the quantizer" if (args.work / "int4-head").is_symlink()
               else "this script (RTN g128 of the embedding; the quantizer wrote none)")
    print(f"Hunyuan-0.5B shape (random weights, {args.method} checkpoint; INT4 head written by "
          f"{head_by}), batch 1, prompt "
          f"{args.prompt} tokens; medians of {args.rounds} interleaved rounds; load average "
          f"{load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; numpy bandwidth copy "
          f"{copy:.1f} GB/s (two threads {copy2:.1f}), read-only {read:.1f} GB/s (medians of "
          f"{len(bw)}); ceiling = copy bandwidth / weights read per token")
    print(f"| engine | weights MB/token | prefill ms | decode tok/s | vs genai b128 | "
          f"% of ceiling (copy {copy:.1f} GB/s) | % (read {read:.1f}) |")
    print("|---|---|---|---|---|---|---|")
    for name, t in table.items():
        ceiling = copy * 1e3 / t["mb_per_token"]
        t["pct_ceiling_copy"] = 100 * t["decode_tok_s"] / ceiling
        t["pct_ceiling_read"] = 100 * t["decode_tok_s"] * t["mb_per_token"] / (read * 1e3)
        print(f"| {name} | {t['mb_per_token']:.0f} | {t['prefill_ms']:.0f} | "
              f"{t['decode_tok_s']:.1f} | {t['decode_tok_s'] / anchor:.2f}x | "
              f"{t['pct_ceiling_copy']:.0f} % of {ceiling:.0f} | {t['pct_ceiling_read']:.0f} % |")
    print(json.dumps({"table": table, "bandwidth": bw, "load_start": load0,
                      "load_end": os.getloadavg(), "args": {k: str(v) for k, v in
                                                           vars(args).items()}}))


def accuracy(work: Path, tokens: int = 2048, window: int = 128) -> None:
    """Default model, INT4 AWQ (the default recipe's quantization), float32 graph: perplexity on
    held-out text and top-1 agreement of MatMulNBits accuracy level 4 (int8 activations) and 1,
    with the float head (quantize.exclude=[lm_head], the default) and an INT4 head (exclude=[])."""
    import torch
    from transformers import AutoModelForCausalLM

    from trt_pipeline.backends.onnx.lower import lower_checkpoint
    from trt_pipeline.backends.onnx.runtime import OnnxModel
    from trt_pipeline.families.apply import convert_checkpoint
    from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
    from trt_pipeline.textdata import eval_windows

    src = REPO / "trt_pipeline" / "data" / "default_model"
    if not (work / "fp16" / "config.json").is_file():
        convert_checkpoint(src, work / "fp16", "float16")
    ids = eval_windows("builtin", src, 2048, tokens, window, key="text")
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = {"transformers float32": np.stack([hf(r[None]).logits[0].numpy() for r in ids])}
    for head, exclude in (("float head", ("lm_head",)), ("INT4 head", ())):
        ckpt, graph = work / f"awq-{head[0]}", work / f"onnx-{head[0]}"
        if not (graph / "model.onnx").is_file():
            quantize_checkpoint(work / "fp16", ckpt, QuantParams(method="awq", exclude=exclude))
            lower_checkpoint(ckpt, graph, "float32")
        for level in (1, 4):
            m = OnnxModel.load(graph, accuracy_level=level)
            logits[f"{head}, level {level}"] = np.stack([m.forward(r[None].numpy())[0]
                                                         for r in ids])
    base, hf_top = logits["float head, level 1"], logits["transformers float32"].argmax(-1)
    print(f"default model, INT4 AWQ g128, float32 graph; {ids.numel()} held-out tokens in "
          f"windows of {window}")
    print("| logits | perplexity | top-1 vs float head level 1 | top-1 vs transformers | "
          "max abs diff vs float head level 1 |")
    print("|---|---|---|---|---|")
    nxt = ids[:, 1:].numpy()
    for name, x in logits.items():
        z = x[:, :-1].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ppl = float(np.exp(-np.take_along_axis(logp, nxt[..., None], -1).mean()))
        print(f"| {name} | {ppl:.3f} | {(x.argmax(-1) == base.argmax(-1)).mean():.4f} | "
              f"{(x.argmax(-1) == hf_top).mean():.4f} | {np.abs(x - base).max():.3g} |")


if __name__ == "__main__":
    main()
