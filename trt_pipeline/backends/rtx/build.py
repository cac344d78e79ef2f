"""Build a TensorRT for RTX engine from the lowered float16 ONNX graph for one target SM, on a
machine with or without a GPU (CPU-only AOT: facts/tensorrt-rtx.md §2).

- Everything checkable without TensorRT work is checked first and reported at once: limits, an
  SM the installed TensorRT for RTX has no `ComputeCapability` for (no SM90), precisions the SM
  lacks (FP8 from SM89, FP4 from SM120), a float32 graph (no float32 attention kernel:
  backends/onnx/ops.py), max_seq_len beyond the RoPE table.
- One optimization profile serves prefill and decode; its opt is the decode shape (the call made
  per token). A decode-only second profile (`decode_profile`) doubles the Myelin graphs and the
  build time for nothing measurable here (Hunyuan-0.5B INT4, SM86, 2 CPUs: 12.5 -> 23.7 s, engine
  492.6 -> 505.3 MB, weights shared; tiny llama fp16: 5.8 -> 7.5 MB). Kernels are compiled at run
  time ("Compiler backend is used during engine execution"), so opt shapes matter less than in
  standard TensorRT.
- No timing cache: "Timing cache operations are no-ops in TensorRT-RTX" (1.7.1's
  DeprecationWarning), a build serializes 0 entries, and reloading one without a GPU logs CUDA
  errors. The runtime cache of JIT-compiled kernels needs a GPU: engine.py keeps it.
- The VERBOSE + DETAILED builder log is the only per-layer view without a GPU (the engine
  inspector needs a deserialized engine): kept whole in build.log; its "Layers:" listing and
  memory totals are parsed into the metrics.
"""

from __future__ import annotations

import logging
import re
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, TextIO

from ...errors import BadInput, Problem, StageFailed
from ...fsio import link_or_copy, write_bytes_atomic

log = logging.getLogger(__name__)
ENGINE_FILE = "model.engine"
LOG_FILE = "build.log"
ONNX_DIR = "onnx"  # the graph the engine was built from: the CPU fallback runs it
GRAPH_FILES = ("model.onnx", "model.onnx.data")  # backends/onnx/lower.py MODEL_FILE, DATA_FILE
TRACE = 5  # TensorRT's VERBOSE sits below logging.DEBUG
LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR,
          "WARNING": logging.WARNING, "INFO": logging.DEBUG, "VERBOSE": TRACE}
# TensorRT for RTX support matrix 1.4 (facts/tensorrt-rtx.md §2): what each SM computes in.
SM_PRECISIONS = {75: ("fp32", "fp16"), 80: ("fp32", "fp16", "bf16", "int8", "int4"),
                 86: ("fp32", "fp16", "bf16", "int8", "int4"),
                 89: ("fp32", "fp16", "bf16", "int8", "int4", "fp8")}
SM_PRECISIONS |= {sm: (*SM_PRECISIONS[89], "fp4") for sm in (120, 121)}
ONNX_PRECISIONS = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "INT8": "int8",
                   "INT4": "int4", "FLOAT8E4M3FN": "fp8", "FLOAT8E5M2": "fp8",
                   "FLOAT4E2M1": "fp4"}
DTYPE_BITS = {"Int4": 4, "Int8": 8, "UInt8": 8, "Bool": 8, "FP8": 8, "Half": 16, "BFloat16": 16,
              "Float": 32, "Int32": 32, "Int64": 64}
TOTALS = {
    "weights_bytes": r"Total Weights Memory: (\d+) bytes",
    "activation_bytes": r"Total Activation Memory: (\d+) bytes",
    "scratch_bytes": r"Max Scratch Memory: (\d+) bytes",
    "host_persistent_bytes": r"Total Host Persistent Memory: (\d+) bytes",
    "device_persistent_bytes": r"Total Device Persistent Memory: (\d+) bytes",
    "engine_generation_s": r"Engine generation completed in ([\d.]+) seconds",
    "builder_peak_cpu_mib": r"memory allocators: CPU (\d+) MiB",
    "builder_peak_gpu_mib": r"memory allocators: CPU \d+ MiB, GPU (\d+) MiB",
}
LAYER = re.compile(r"Name: ([^,]*), LayerType: (\w+)")
CONSTANT = re.compile(r"\{ Name: ([^,]+), Dimensions: \[([-\d,]*)\],[^{}]*?Datatype: (\w+),")
ONNX_NODE = "[ONNX Layer: "  # Metadata items, separated by \x1f; node names may hold [e]


@dataclass(frozen=True, slots=True)
class RtxBuildSpec:
    """What to build: the target (a TARGETS name, recorded), its SM, and the engine's limits."""

    target: str
    sm: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    decode_profile: bool = False  # a second profile with seq fixed at 1 (see the module doc)

    def profiles(self) -> list[tuple[tuple[int, int, int], ...]]:
        """(min, opt, max) of (batch, seq, past) per optimization profile; total = past + seq
        is capped at max_seq_len in the mask's shape."""
        b, past = self.max_batch_size, self.max_seq_len - 1
        decode = ((1, 1, 0), (b, 1, past // 2), (b, 1, past))
        if not self.decode_profile:
            return [((1, 1, 0), decode[1], (b, self.max_input_len, past))]
        return [((1, 1, 0), (b, self.max_input_len, 0), (b, self.max_input_len, past)), decode]


def precision_problems(sm: int, precisions: set[str] | tuple[str, ...]) -> list[Problem]:
    """Precisions the graph (or a request) needs that TensorRT for RTX cannot build for `sm`."""
    have = SM_PRECISIONS.get(sm, ())
    missing = sorted(set(precisions) - set(have))
    if not missing or not have:
        return []
    able = sorted(s for s, p in SM_PRECISIONS.items() if set(missing) <= set(p))
    return [Problem("build.target", f"sm{sm} has no {', '.join(missing)} in TensorRT for RTX "
                    f"(it builds {', '.join(have)})", f"Use a float16/INT4 graph, or a target of "
                    f"sm{', sm'.join(map(str, able))}." if able else None)]


def spec_problems(spec: RtxBuildSpec) -> list[Problem]:
    out = []
    if spec.max_batch_size < 1:
        out.append(Problem("build.max_batch_size", f"got {spec.max_batch_size}; expected >= 1"))
    if not 1 <= spec.max_input_len <= spec.max_seq_len:
        out.append(Problem("build.max_input_len", f"got {spec.max_input_len} with max_seq_len "
                           f"{spec.max_seq_len}; expected 1 <= max_input_len <= max_seq_len",
                           f"Set build.max_input_len={max(1, spec.max_seq_len)}."))
    return out


def graph_problems(onnx_dir: Path, spec: RtxBuildSpec) -> tuple[set[str], list[Problem]]:
    """(precisions of the graph's initializers, problems) from model.onnx without its data."""
    import onnx

    missing = [f for f in GRAPH_FILES if not (onnx_dir / f).is_file()]
    if missing:
        return set(), [Problem("inputs.onnx", f"{onnx_dir} lacks {', '.join(missing)}",
                               "Run the lower stage (backends/onnx/lower.py) first.")]
    model = onnx.load(str(onnx_dir / GRAPH_FILES[0]), load_external_data=False)
    names = onnx.TensorProto.DataType.Name
    precisions = {ONNX_PRECISIONS[names(t.data_type)] for t in model.graph.initializer
                  if names(t.data_type) in ONNX_PRECISIONS}
    out = precision_problems(spec.sm, precisions)
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    kv_type = names(past[0].type.tensor_type.elem_type) if past else "none"
    if kv_type != "FLOAT16":
        out.append(Problem("build.dtype", f"the graph's activations are {kv_type}; TensorRT for "
                           "RTX has no float32 attention kernel (backends/onnx/ops.py)",
                           "Lower the checkpoint with dtype float16."))
    props = {p.key: p.value for p in model.metadata_props}
    rope = int(props.get("max_position_embeddings", spec.max_seq_len))
    if spec.max_seq_len > rope:
        out.append(Problem("build.max_seq_len", f"got {spec.max_seq_len}; the graph's RoPE table "
                           f"has {rope} positions", f"Set build.max_seq_len={rope} or less."))
    return precisions, out


def _trt() -> Any:
    try:
        import tensorrt_rtx as trt
    except ImportError as exc:
        raise BadInput([Problem("build.backend", f"tensorrt_rtx is not importable ({exc})",
                                "pip install 'trt-pipeline[rtx]' (tensorrt-rtx-cu12==1.7.1.116).")
                        ]) from None
    return trt


def build_engine(onnx_dir: Path, out_dir: Path, spec: RtxBuildSpec) -> dict[str, Any]:
    """Parse onnx_dir/model.onnx, build for spec.sm, write out_dir/model.engine, build.log and
    onnx/ (hard links to the graph); return the build metrics with the manifest's `runtime`."""
    trt = _trt()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    cc = trt.ComputeCapability.__members__.get(f"SM{spec.sm}")
    problems = spec_problems(spec)
    if cc is None:
        sms = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        problems.append(Problem("build.target", f"{spec.target} is sm{spec.sm}; TensorRT for RTX "
                                f"{trt.__version__} builds only for {', '.join(sms)} (no SM90: "
                                "Hopper data-centre GPUs are not TensorRT for RTX targets)",
                                "Pick an RTX target (e.g. rtx3060-12gb), or build.backend=trtllm "
                                "or onnx for this GPU."))
    precisions, more = graph_problems(onnx_dir, spec)
    if problems or more:
        raise BadInput(problems + more, str(onnx_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _sampled_rss() as rss, (out_dir / LOG_FILE).open("w") as f:
        logger = _make_logger(trt, f)
        blob = _build(trt, logger, onnx_dir, spec, cc, out_dir / LOG_FILE)
        build_s = time.perf_counter() - start
        engine_bytes = blob.nbytes
        write_bytes_atomic(out_dir / ENGINE_FILE, blob)  # IHostMemory is a buffer: no copy
        del blob
    for name in GRAPH_FILES:
        link_or_copy(onnx_dir / name, out_dir / ONNX_DIR / name)
    text = "\n".join(logger.kept)
    metrics = {
        "engine_bytes": engine_bytes, "build_s": round(build_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mb": rss["before"], "build_peak_rss_mb": rss["peak"],
        "build_rss_delta_mb": round(rss["peak"] - rss["before"], 1),
        "trt": totals(text), **layer_summary(text), "precisions": sorted(precisions),
        "profiles": [dict(zip(("min", "opt", "max"), p, strict=True)) for p in spec.profiles()],
        "warnings": len(logger.warnings),
        "runtime": runtime_dict(spec, trt.__version__),
    }
    if not metrics["trt"]:  # TensorRT keeps the first logger while any Builder/Runtime lives
        log.warning("TensorRT logged this build elsewhere (a Builder or Runtime alive in this "
                    "process registered its logger first): %s and the metrics lack its figures",
                    out_dir / LOG_FILE)
    log.info("built %s for sm%d (%s): %.1f MB in %.1f s", out_dir / ENGINE_FILE, spec.sm,
             spec.target, engine_bytes / 1e6, build_s)
    return metrics


def runtime_dict(spec: RtxBuildSpec, version: str) -> dict[str, Any]:
    from ..onnx.runtime import FAST  # the CPU fallback runs INT4 at ONNX Runtime's fast level

    return {"kind": "tensorrt_rtx", "engine": ENGINE_FILE, "sm": spec.sm, "target": spec.target,
            "version": version, "max_batch_size": spec.max_batch_size,
            "max_input_len": spec.max_input_len, "max_seq_len": spec.max_seq_len,
            "decode_profile": 1 if spec.decode_profile else None,
            "cpu_fallback": {"kind": "onnxruntime", "model_dir": ONNX_DIR,
                             "accuracy_level": FAST}}


def _build(trt: Any, logger: Any, onnx_dir: Path, spec: RtxBuildSpec, cc: Any, log_path: Path
           ) -> Any:
    builder = trt.Builder(logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, logger)
    if not parser.parse_from_file(str(onnx_dir / GRAPH_FILES[0])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise StageFailed(_failure(spec, "could not parse " + str(onnx_dir / GRAPH_FILES[0]),
                                   errors, log_path))
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(cc, 0)
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    inputs = [net.get_input(i) for i in range(net.num_inputs)]
    for lo, opt, hi in spec.profiles():
        profile = builder.create_optimization_profile()
        for t in inputs:
            profile.set_shape(t.name, *(_shape(t, d, spec.max_seq_len) for d in (lo, opt, hi)))
        cfg.add_optimization_profile(profile)
    blob = builder.build_serialized_network(net, cfg)
    if blob is None:
        raise StageFailed(_failure(spec, "could not build the engine", logger.errors, log_path))
    return blob


def _shape(t: Any, dims: tuple[int, int, int], max_seq_len: int) -> tuple[int, ...]:
    """An input's shape for (batch, seq, past), from the graph's I/O contract (lower.py)."""
    b, s, past = dims
    if t.name in ("input_ids", "position_ids"):
        return (b, s)
    if t.name == "attention_mask":
        return (b, 1, s, min(past + s, max_seq_len))
    return (b, t.shape[1], past, t.shape[3])  # past_key_values.{i}.key|value


def _failure(spec: RtxBuildSpec, what: str, errors: list[str], log_path: Path) -> str:
    quoted = "\n".join(f"  {e}" for e in errors) or "  (TensorRT reported no error message)"
    return (f"build_rtx [tensorrt_rtx, {spec.target} sm{spec.sm}]: TensorRT for RTX {what}:\n"
            f"{quoted}\nFull builder log: {log_path}")


def _make_logger(trt: Any, file: TextIO) -> Any:
    class Logger(trt.ILogger):
        """Every message to `file` and to logging; errors, warnings and INFO+ kept for parsing."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.kept: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if not file.closed:  # a builder freed after a failure still logs
                file.write(f"[{severity.name}] {msg}\n")
            log.log(LEVELS[severity.name], "%s", msg)
            if severity.name in ("ERROR", "INTERNAL_ERROR"):
                self.errors.append(msg)
            elif severity.name == "WARNING":
                self.warnings.append(msg)
            if severity.name != "VERBOSE" or msg.startswith(("Layers:", "Layer: ")):
                self.kept.append(msg)

    return Logger()


def totals(text: str) -> dict[str, float]:
    """The memory and time totals TensorRT prints (the largest when printed per profile)."""
    out: dict[str, float] = {}
    for key, pattern in TOTALS.items():
        found = [float(v) for v in re.findall(pattern, text)]
        if found:
            out[key] = max(found) if key.endswith("_s") else int(max(found))
    return out


def parse_layers(text: str) -> list[dict[str, Any]]:
    """The "Layers:" listing: per Myelin layer its name, type, kernel family (the name without
    its numbering), Myelin graph, constants (name, dims, dtype) and the ONNX nodes it came from
    (Metadata)."""
    out = []
    for line in text.splitlines():
        m = LAYER.match(line)
        if not m:
            continue
        seg = line[line.find("Constants: ["):line.find("Outputs: [")]
        consts = [(n, tuple(int(x) for x in d.split(",") if x), dt)
                  for n, d, dt in CONSTANT.findall(seg)]
        graph = re.search(r"_myl(\d+)_\d+$", m.group(1))
        out.append({"name": m.group(1), "type": m.group(2), "constants": consts,
                    "graph": int(graph.group(1)) if graph else 0,
                    "family": re.sub(r"^__myl_|_myl\d+_\d+$", "", m.group(1)),
                    "onnx_nodes": [x.strip().removeprefix(ONNX_NODE).removesuffix("]")
                                   for x in line[line.rfind("Metadata: ") + 10:].split("\x1f")
                                   if ONNX_NODE in x]})
    return out


def layer_summary(text: str) -> dict[str, Any]:
    """Counts by layer type and kernel family, and the listed constants' bytes by dtype, of the
    first Myelin graph (each profile gets one, `_myl<k>_`, over the same stored weights). A
    constant read in two layouts is listed twice (the tied embedding: gather table and transposed
    lm_head); trt.weights_bytes is what is stored."""
    graphs = Counter(x["graph"] for x in parse_layers(text))
    layers = [x for x in parse_layers(text) if x["graph"] == min(graphs, default=0)]
    consts = {n: (dims, dt) for layer in layers for n, dims, dt in layer["constants"]}
    by_dtype: Counter[str] = Counter()
    for dims, dt in consts.values():
        by_dtype[dt] += prod(dims) * DTYPE_BITS.get(dt, 0) // 8
    int4 = [x for x in layers if any(dt == "Int4" for _, _, dt in x["constants"])]
    return {"myelin_graphs": len(graphs),
            "layers": dict(sorted(Counter(x["type"] for x in layers).items())),
            "kernel_families": dict(Counter(x["family"] for x in layers).most_common(12)),
            "constant_bytes_listed": dict(sorted(by_dtype.items())),
            "int4_weight_bytes": by_dtype.get("Int4", 0), "int4_layers": len(int4),
            "int4_kernel_families": dict(Counter(x["family"] for x in int4))}


@contextmanager
def _sampled_rss() -> Iterator[dict[str, float]]:
    """This process's RSS (MB) before and at its peak during the block, sampled every 20 ms by a
    thread (the build releases the GIL). ru_maxrss cannot say this: it is the lifetime peak of
    the process, and a child process even inherits its parent's."""
    import psutil

    proc, stop = psutil.Process(), threading.Event()
    peak = [proc.memory_info().rss]
    seen = {"before": round(peak[0] / 2**20, 1)}

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(max(peak.pop(), proc.memory_info().rss))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen["peak"] = round(max(peak[0], proc.memory_info().rss) / 2**20, 1)
