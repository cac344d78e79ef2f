"""Run a TensorRT for RTX engine with its KV cache on an RTX GPU; without one, run the very same
graph (the engine dir's onnx/) with ONNX Runtime and say why.

The engine keeps the lowered graph's I/O (backends/onnx/lower.py): `present = Concat(past, new)`
is an output of its own, so the cache is two full-size device buffers per K/V tensor that swap
roles each step (present becomes the next past with no host round trip). Only the ids, positions
and mask go up, and only the logits come back. Positions and mask are built exactly as the ONNX
Runtime path builds them (`step_inputs`), so left padding behaves the same.

Where the GPU path cannot run: no tensorrt_rtx, no CUDA GPU, or a GPU TensorRT for RTX does not
target (SM90 Hopper): warning + ONNX Runtime. A suitable GPU with an engine built for another SM
or another TensorRT for RTX version: refused (BadInput), since the engine must be rebuilt.
Measured on an H200 (1.7.1.116): SM80/86/89/120 and portable engines are all INVALID
(UNSUPPORTED_CC), and deserializing says "The engine cannot run on this GPU, which has compute
capability 9.0. Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0. TensorRT-RTX does
not support this compute capability, so the engine cannot be rebuilt for it."
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BadInput, Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    sm: int  # compute capability as an int: 86 = 8.6


def find_gpu() -> Gpu | None:
    """GPU 0 as torch.cuda sees it, else as nvidia-smi lists it; None when neither finds one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return Gpu(torch.cuda.get_device_name(0), 10 * major + minor)
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    res = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    if res.returncode or not res.stdout.strip():
        return None
    name, cap = res.stdout.strip().splitlines()[0].rsplit(",", 1)
    major, minor = cap.strip().split(".")
    return Gpu(name.strip(), 10 * int(major) + int(minor))


def decide(runtime: dict[str, Any], gpu: Gpu | None, installed: str | None,
           target_sms: tuple[int, ...]) -> str | None:
    """Why the engine cannot run here (the ONNX Runtime fallback then runs), or None when it
    can. Raises BadInput for an engine that a suitable GPU could run only after a rebuild.
    `installed`: tensorrt_rtx's version, None when absent; `target_sms`: the SMs it builds for."""
    built = (f"the engine was built for sm{runtime['sm']} with TensorRT for RTX "
             f"{runtime['version']}")
    if installed is None:
        return f"tensorrt_rtx is not installed (pip install 'trt-pipeline[rtx]'); {built}"
    if gpu is None:
        return f"no CUDA GPU found (torch.cuda, nvidia-smi); {built}"
    if gpu.sm not in target_sms:
        kind = " (a data-centre Hopper GPU)" if gpu.sm == 90 else ""
        return (f"{gpu.name} is sm{gpu.sm}{kind}, which TensorRT for RTX {installed} does not "
                f"target (it runs sm{', sm'.join(map(str, target_sms))}); {built}")
    problems = []
    if runtime["sm"] != gpu.sm:
        problems.append(Problem("runtime.sm", f"{built}; this GPU, {gpu.name}, is sm{gpu.sm}",
                                f"Rebuild the engine for this GPU's target (an sm{gpu.sm} "
                                "target in build.target)."))
    if runtime["version"] != installed:
        problems.append(Problem("runtime.version", f"{built}; TensorRT for RTX {installed} is "
                                "installed, and engines do not load across versions",
                                f"Rebuild with {installed} (build-engine build RECIPE --force "
                                f"build_rtx), or install tensorrt-rtx-cu12=={runtime['version']}."
                                ))
    if problems:
        raise BadInput(problems)
    return None


def installed() -> tuple[str | None, tuple[int, ...]]:
    """(tensorrt_rtx version or None, the SMs it can build for)."""
    try:
        import tensorrt_rtx as trt
    except ImportError:
        return None, ()
    sms = tuple(int(m[2:]) for m in trt.ComputeCapability.__members__ if m.startswith("SM"))
    return trt.__version__, sms


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> Any:
    """backends.RUNTIMES entry: the engine on this GPU, else ONNX Runtime on the same graph."""
    engine_dir = Path(engine_dir)
    installed_version, sms = installed()
    gpu = find_gpu() if installed_version else None
    why = decide(runtime, gpu, installed_version, sms)
    if why is None:
        return RtxModel(engine_dir, runtime)
    from ..onnx.runtime import open_runtime as open_onnx

    fallback = runtime["cpu_fallback"]
    log.warning("%s: not running the TensorRT for RTX engine: %s. Running %s/ with ONNX Runtime "
                "on the CPU instead (same graph, much slower).", engine_dir, why,
                fallback["model_dir"])
    return open_onnx(engine_dir, fallback)  # it opens engine_dir / fallback["model_dir"]


def runtime_cache_path(sm: int, version: str) -> Path:
    """TensorRT for RTX compiles kernels at run time; they are cached per SM and version."""
    from ...cache import default_cache_root

    return default_cache_root() / "timing" / f"sm{sm}" / f"runtime-trt{version}.cache"


@dataclass
class RtxKVCache:
    """bufs[h, j]: flat fp16 storage for K/V tensor j (2 per layer), half h; half `past` holds
    the cache [B, kv_heads, length, head_size] as its first values."""

    bufs: Any  # torch.Tensor [2, 2 * layers, B * kv_heads * max_seq_len * head_size]
    batch: int
    past: int = 0
    valid: np.ndarray | None = None

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


class RtxModel:
    """A StepModel (runner/step.py) over a deserialized engine on GPU 0."""

    runtime = "tensorrt_rtx"

    def __init__(self, engine_dir: Path, runtime: dict[str, Any]) -> None:
        import tensorrt_rtx as trt

        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        blob = (engine_dir / runtime["engine"]).read_bytes()
        rt = trt.Runtime(self.trt_logger)
        validity, diagnostics = rt.get_engine_validity(blob)
        if validity == trt.EngineValidity.INVALID:
            flags = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items()
                     if int(diagnostics) & int(v)]
            raise BadInput([Problem("runtime.engine", f"TensorRT for RTX calls "
                                    f"{engine_dir / runtime['engine']} invalid here: "
                                    f"{', '.join(flags) or 'no reason given'}",
                                    "Rebuild the engine for this GPU and version.")])
        self.engine = rt.deserialize_cuda_engine(blob)
        del blob
        config = self.engine.create_runtime_config()
        self.cache_path = runtime_cache_path(runtime["sm"], runtime["version"])
        self.runtime_cache = config.create_runtime_cache()
        if self.cache_path.is_file():
            self.runtime_cache.deserialize(self.cache_path.read_bytes())
        config.set_runtime_cache(self.runtime_cache)
        self.context = self.engine.create_execution_context(config)
        _, self.num_kv_heads, _, self.head_size = self.engine.get_tensor_shape(
            "past_key_values.0.key")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.num_layers = sum(n.startswith("past_key_values.") for n in names) // 2
        self.vocab_size = tuple(self.engine.get_tensor_shape("logits"))[-1]
        self.max_batch_size = runtime["max_batch_size"]
        self.max_seq_len = runtime["max_seq_len"]
        self.decode_profile = runtime.get("decode_profile")
        self._profile = 0
        self._unsaved = False

    def new_cache(self, batch: int) -> RtxKVCache:
        import torch

        if self._unsaved:  # kernels compiled by the last requests
            self.save_runtime_cache()
        size = batch * self.num_kv_heads * self.max_seq_len * self.head_size
        return RtxKVCache(torch.empty((2, 2 * self.num_layers, size), dtype=torch.float16,
                                      device="cuda"), batch)

    def save_runtime_cache(self) -> None:
        from ...fsio import write_bytes_atomic

        write_bytes_atomic(self.cache_path, bytes(self.runtime_cache.serialize()))
        self._unsaved = False

    def step(self, input_ids: np.ndarray, cache: RtxKVCache, valid: np.ndarray,
             last_only: bool = False) -> np.ndarray:  # the engine computes every position
        import torch

        from ..onnx.runtime import step_inputs

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        total = cache.length + s
        if b != cache.batch or total > self.max_seq_len:
            raise BadInput([Problem("runner", f"step of batch {b} to length {total}; the cache "
                                    f"holds batch {cache.batch} and the engine "
                                    f"max_seq_len={self.max_seq_len}")])
        positions, mask, all_valid = step_inputs(ids, cache.valid, valid)
        stream = torch.cuda.current_stream()
        inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        dev = {k: torch.from_numpy(np.ascontiguousarray(v)).to("cuda") for k, v in inputs.items()}
        logits = torch.empty((b, s, self.vocab_size), dtype=torch.float32, device="cuda")
        profile = 1 if self.decode_profile and s == 1 else 0
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        for name, t in dev.items():
            self._bind(name, t.data_ptr(), tuple(t.shape))
        self._bind("logits", logits.data_ptr(), None)
        kv = (b, self.num_kv_heads)
        src, dst = cache.bufs[cache.past], cache.bufs[1 - cache.past]
        for j in range(2 * self.num_layers):
            i, part = divmod(j, 2)
            part_name = ("key", "value")[part]
            self._bind(f"past_key_values.{i}.{part_name}", src[j].data_ptr(),
                       (*kv, cache.length, self.head_size))
            self._bind(f"present.{i}.{part_name}", dst[j].data_ptr(), None)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT for RTX execute_async_v3 failed; see the log above")
        out = logits.cpu().numpy()  # synchronizes the stream
        cache.past, cache.valid = 1 - cache.past, all_valid
        self._unsaved = True
        return out

    def _bind(self, name: str, ptr: int, shape: tuple[int, ...] | None) -> None:
        if shape is not None:
            self.context.set_input_shape(name, shape)
        self.context.set_tensor_address(name, ptr)
