"""TensorRT-LLM 1.2.1: build-spec -> `trtllm-build` argv (pure), the environment doctor, the
build subprocess, and the ModelRunnerCpp adapter. The only module that touches `tensorrt_llm`.

Sources (NVIDIA/TensorRT-LLM unless a URL): flags from `tensorrt_llm/commands/build.py`
@65f1d1536e18 `parse_arguments` and `tensorrt_llm/plugin/plugin.py` @c20322ffd3dc
(`PluginConfig`, `cli_plugin_args`, `add_plugin_argument`); the recorded flag set is
tests/data/trtllm_1_2_1_build_flags.json. facts/trtllm.md §1, §4, §5, §12.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any, Literal

from ..errors import BadInput, Problem, StageFailed

log = logging.getLogger(__name__)

# The pinned triple. tensorrt_llm 1.2.1 is the last stable release with trtllm-build (facts §1-2).
# TensorRT 10.14.1.48 and CUDA 13.1.0: docker/common/install_tensorrt.sh as aligned with NGC
# PyTorch 25.12 (TRT_VER="10.14.1.48", CUDA_VER="13.1"; a version found in the code index, its
# commit not shown); the 1.2.1 wheel pins tensorrt~=10.14.1 (third-party reads of its
# METADATA). Base image: docs/source/release-notes.md
# "TensorRT-LLM Release 1.2": nvcr.io/nvidia/pytorch:25.12-py3; PR #12754 "Bumped base Docker
# image to 25.12, CUDA to 13.1". The release container tag is the version (docker/release.md:
# nvcr.io/nvidia/tensorrt-llm/release:x.y.z).
TRTLLM_VERSION = "1.2.1"
TENSORRT_VERSION = "10.14.1"
CUDA_VERSION = "13.1"
NGC_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}"
# CUDA 13 user space needs an R580+ driver (minor-version compatibility within CUDA 13; the
# Triton 25.12 matrix pairs CUDA 13.0.2 with 580.95.05). facts §1: unverified on GeForce.
MIN_DRIVER_MAJOR = 580
MIN_SM = 80  # Turing unsupported since 0.14 (#2620); the support matrix starts at Ampere SM80.
WEIGHT_ONLY = ("W4A16_AWQ", "W4A16", "W8A16")
LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose")  # tensorrt_llm/logger.py
NVIDIA_SMI_QUERY = "index,name,compute_cap,memory.free,memory.total,driver_version"
INSTALL_FIX = (f"Run inside the TensorRT-LLM {TRTLLM_VERSION} container: `docker build -f "
               f"Dockerfile.ngc -t trt-pipeline:trtllm .` (FROM {NGC_IMAGE}), then `docker run "
               "--gpus all ... trt-pipeline:trtllm build RECIPE`; or, on Linux with Python 3.12 "
               f"and CUDA 13, `pip install tensorrt-llm=={TRTLLM_VERSION} "
               "--extra-index-url https://pypi.nvidia.com`.")

PluginValue = Literal["auto", "float16", "bfloat16", "float32", "disable"]


@dataclass(frozen=True, slots=True)
class TrtllmBuildSpec:
    """Everything one `trtllm-build` run depends on. The limits come from the recipe (never
    upstream's 2048 batch / 8192 tokens); checkpoint_dtype, quant_algo, kv_cache_quant_algo and
    moe come from the checkpoint's config.json; target_sm is the GPU the engine is for."""

    checkpoint_dir: Path
    output_dir: Path
    timing_cache: Path
    checkpoint_dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    moe: bool
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    gpt_attention_plugin: PluginValue
    gemm_plugin: PluginValue
    moe_plugin: PluginValue
    kv_cache_type: Literal["paged", "continuous"]
    workers: int
    target_sm: int
    log_level: str = "info"


def spec_problems(spec: TrtllmBuildSpec) -> list[Problem]:
    """Everything wrong with a spec, located by the recipe key that sets it."""
    out: list[Problem] = []
    dt = spec.checkpoint_dtype
    for key, value in (("build.max_batch_size", spec.max_batch_size),
                       ("build.max_num_tokens", spec.max_num_tokens),
                       ("build.max_input_len", spec.max_input_len),
                       ("build.workers", spec.workers)):
        if value < 1:
            out.append(Problem(key, f"got {value}; expected a positive integer", None))
    if spec.max_input_len > spec.max_seq_len:
        out.append(Problem("build.max_input_len", f"got {spec.max_input_len}, more than "
                           f"build.max_seq_len ({spec.max_seq_len})",
                           f"Set build.max_input_len<={spec.max_seq_len}."))
    for key, value in (("build.plugins.gpt_attention", spec.gpt_attention_plugin),
                       ("build.plugins.gemm", spec.gemm_plugin),
                       ("build.plugins.moe", spec.moe_plugin)):
        if value not in ("auto", "disable", dt):
            out.append(Problem(key, f"got {value}; the checkpoint is {dt} and a plugin in another "
                               "dtype converts every call", f"Set {key}=auto."))
    if spec.gpt_attention_plugin == "disable":
        out.append(Problem("build.plugins.gpt_attention", "got disable; the paged KV cache and "
                           "removed input padding need the GPT attention plugin",
                           "Set build.plugins.gpt_attention=auto."))
    if spec.moe and spec.moe_plugin == "disable" and spec.quant_algo in WEIGHT_ONLY:
        out.append(Problem("build.plugins.moe", f"got disable with {spec.quant_algo} experts; "
                           "MoeOOTB raises 'OOTB MOE does not support weight only quantization' "
                           "(tensorrt_llm/layers/moe.py)", "Set build.plugins.moe=auto."))
    if not spec.moe and spec.moe_plugin not in ("auto", "disable"):
        out.append(Problem("build.plugins.moe", f"got {spec.moe_plugin} for a dense model",
                           "Set build.plugins.moe=auto."))
    if spec.quant_algo in WEIGHT_ONLY and 100 <= spec.target_sm < 120:
        out.append(Problem("quantize.method", f"{spec.quant_algo} weight-only GEMMs raise on "
                           f"SM{spec.target_sm} in TensorRT-LLM {TRTLLM_VERSION} "
                           "(tensorrt_llm/builder.py, facts §5)",
                           "Use quantize.method=none for SM100-SM119 targets."))
    if spec.log_level not in LOG_LEVELS:
        out.append(Problem("log_level", f"got {spec.log_level!r}; expected one of "
                           f"{', '.join(LOG_LEVELS)}", None))
    return out


def gemm_plugin(spec: TrtllmBuildSpec) -> str:
    """--gemm_plugin: `auto` (= the model dtype, PluginConfig.__getattribute__) for float
    checkpoints. For weight-only ones (W4A16_AWQ, W4A16, W8A16) `auto` means `disable`: the
    plugin only serves non-quantized GEMMs (PluginConfig.gemm_plugin description, plugin.py), and
    builder.build sets weight_only_groupwise_quant_matmul_plugin (per-group) or
    weight_only_quant_matmul_plugin (per-channel) to the model dtype by itself (facts §5)."""
    if spec.gemm_plugin == "auto" and spec.quant_algo in WEIGHT_ONLY:
        return "disable"
    return spec.gemm_plugin


def build_command(spec: TrtllmBuildSpec) -> list[str]:
    """The `trtllm-build` argv of TensorRT-LLM 1.2.1 for spec (pure). Every limit, plugin and
    feature flag is explicit: defaults moved between versions (facts §4)."""
    problems = spec_problems(spec)
    if problems:
        raise BadInput(problems, "trtllm build")
    paged = spec.kv_cache_type == "paged"
    # Paged context FMHA needs the paged cache; the builder turns it off with INT8 KV (facts §5).
    paged_context = paged and spec.kv_cache_quant_algo != "INT8"
    args = {
        "--checkpoint_dir": str(spec.checkpoint_dir),
        "--output_dir": str(spec.output_dir),
        "--max_batch_size": str(spec.max_batch_size),
        "--max_input_len": str(spec.max_input_len),
        "--max_seq_len": str(spec.max_seq_len),
        "--max_num_tokens": str(spec.max_num_tokens),
        "--max_beam_width": "1",
        "--kv_cache_type": spec.kv_cache_type,
        "--gpt_attention_plugin": spec.gpt_attention_plugin,
        "--gemm_plugin": gemm_plugin(spec),
        "--moe_plugin": spec.moe_plugin if spec.moe else "disable",
        "--context_fmha": "enable",
        "--remove_input_padding": "enable",
        "--use_paged_context_fmha": "enable" if paged_context else "disable",
        "--tokens_per_block": "32",
        "--input_timing_cache": str(spec.timing_cache),
        "--output_timing_cache": str(spec.timing_cache),
        "--workers": str(spec.workers),
        "--log_level": spec.log_level,
    }
    return ["trtllm-build", *(x for kv in args.items() for x in kv)]


# --- the doctor ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    sm: int
    free_mib: int
    total_mib: int
    driver: str


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """What this machine has for the trtllm backend, against the pinned triple."""

    versions: dict[str, str]
    gpus: tuple[Gpu, ...]
    problems: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        want = f"tensorrt_llm {TRTLLM_VERSION}, tensorrt {TENSORRT_VERSION}, CUDA {CUDA_VERSION}"
        lines = [f"trtllm backend: pinned {want} ({NGC_IMAGE})"]
        lines += [f"  {k}: {v}" for k, v in self.versions.items()]
        lines += [f"  GPU {g.index}: {g.name}, SM{g.sm}, {g.free_mib}/{g.total_mib} MiB free, "
                  f"driver {g.driver}" for g in self.gpus]
        lines += [f"  problem: {p.render()}" for p in self.problems]
        return "\n".join(lines)


def doctor() -> DoctorReport:
    """Installed tensorrt_llm / tensorrt / CUDA / driver and the GPUs, compared with the pinned
    triple; every problem carries its fix. Imports nothing from the vendor packages."""
    trtllm = _trtllm_version()
    versions = {"tensorrt_llm": trtllm or "absent", "tensorrt": _dist_version("tensorrt")
                or "absent", "torch": _dist_version("torch") or "absent"}
    gpus, smi_error, driver_cuda = _nvidia_smi()
    versions["driver CUDA"] = driver_cuda or "unknown"
    problems = []
    if trtllm is None:
        problems.append(Problem("tensorrt_llm", "not installed (its PyPI package is a stub that "
                                "fetches the real wheel from NVIDIA's index)", INSTALL_FIX))
    elif trtllm != TRTLLM_VERSION:
        problems.append(Problem("tensorrt_llm", f"got {trtllm}; this pipeline pins "
                                f"{TRTLLM_VERSION} (flags, checkpoint and engine format)",
                                INSTALL_FIX))
    if trtllm is not None and not _same_minor(versions["tensorrt"], TENSORRT_VERSION):
        problems.append(Problem("tensorrt", f"got {versions['tensorrt']}; tensorrt_llm "
                                f"{TRTLLM_VERSION} is built against TensorRT {TENSORRT_VERSION}",
                                f'pip install "tensorrt~={TENSORRT_VERSION}", or use {NGC_IMAGE}.'))
    if driver_cuda and int(driver_cuda.split(".")[0]) < int(CUDA_VERSION.split(".")[0]):
        problems.append(Problem("driver CUDA", f"the driver supports CUDA {driver_cuda}; "
                                f"tensorrt_llm {TRTLLM_VERSION} is a CUDA {CUDA_VERSION} build "
                                "(minor versions of one major are compatible, majors are not)",
                                f"Install an NVIDIA driver >= {MIN_DRIVER_MAJOR}."))
    if smi_error:
        problems.append(Problem("gpu", f"no NVIDIA GPU visible ({smi_error}); trtllm-build "
                                "builds for the GPU it runs on", "Run on a machine with the "
                                "target GPU, with `docker run --gpus all`."))
    for g in gpus:
        if int(g.driver.split(".")[0]) < MIN_DRIVER_MAJOR:
            problems.append(Problem("driver", f"GPU {g.index} driver {g.driver}; CUDA "
                                    f"{CUDA_VERSION} needs R{MIN_DRIVER_MAJOR} or newer",
                                    f"Install an NVIDIA driver >= {MIN_DRIVER_MAJOR}."))
        if g.sm < MIN_SM:
            problems.append(Problem("gpu", f"GPU {g.index} {g.name} is SM{g.sm}; TensorRT-LLM "
                                    f"{TRTLLM_VERSION} supports SM{MIN_SM} and newer",
                                    "Use an Ampere or newer GPU, or build.backend=rtx/onnx."))
    return DoctorReport(versions, tuple(gpus), tuple(problems))


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=NVIDIA_SMI_QUERY --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        index, name, cap, free, total, driver = (c.strip() for c in line.split(","))
        major, minor = cap.split(".")
        gpus.append(Gpu(int(index), name, int(major) * 10 + int(minor), int(float(free)),
                        int(float(total)), driver))
    return gpus


def _nvidia_smi() -> tuple[list[Gpu], str, str]:
    """(GPUs, why none, the driver's CUDA version from the banner)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "nvidia-smi not found", ""
    try:
        query = subprocess.run([exe, f"--query-gpu={NVIDIA_SMI_QUERY}",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True,
                               timeout=30)
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}", ""
    if query.returncode != 0:
        return [], f"nvidia-smi: {(query.stderr or query.stdout).strip()}", ""
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    gpus = parse_nvidia_smi(query.stdout)
    return gpus, "" if gpus else "nvidia-smi lists no GPU", cuda.group(1) if cuda else ""


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _trtllm_version() -> str | None:
    """The installed distribution's version, else `__version__` of an importable tensorrt_llm
    package read from its source (importing it would load CUDA libraries)."""
    found = _dist_version("tensorrt_llm") or _dist_version("tensorrt-llm")
    if found:
        return found
    spec = util.find_spec("tensorrt_llm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for fname in ("version.py", "__init__.py"):
            path = Path(loc) / fname
            if path.is_file():
                for node in ast.parse(path.read_text()).body:
                    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                            and any(getattr(t, "id", "") == "__version__" for t in node.targets)):
                        return str(node.value.value)
    return "unknown"


def _same_minor(got: str, want: str) -> bool:
    return got.split(".")[:2] == want.split(".")[:2]


# --- the build -------------------------------------------------------------------------------


def preflight(spec: TrtllmBuildSpec) -> DoctorReport:
    """Refuse a build before anything runs: BadInput for the spec, StageFailed with the doctor's
    report when this machine cannot run TensorRT-LLM 1.2.1 for spec's target."""
    build_command(spec)
    report = doctor()
    problems = list(report.problems) + _gpu_problems(spec, report)
    if problems:
        raise StageFailed("trtllm backend: the build cannot run here.\n"
                          + DoctorReport(report.versions, report.gpus, tuple(problems)).render())
    return report


def run_build(spec: TrtllmBuildSpec, log_path: Path) -> dict[str, Any]:
    """Run trtllm-build for spec with its output kept in log_path (after preflight), then check
    the engine dir."""
    report = preflight(spec)
    argv = build_command(spec)
    exe = shutil.which("trtllm-build")
    cmd = [exe, *argv[1:]] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build",
                                        *argv[1:]]
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    log.info("trtllm-build: %s", shlex.join(argv))
    start = time.monotonic()
    with open(log_path, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n{report.render()}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=spec.output_dir).returncode
    seconds = time.monotonic() - start
    if rc != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-40:])
        raise StageFailed(f"trtllm-build exited with {rc} after {seconds:.0f} s; log "
                          f"{log_path}. Its last lines:\n{tail}")
    engine = check_engine_dir(spec.output_dir)
    gpu = report.gpus[0]
    return {"command": argv, "build_s": round(seconds, 3), "engine": engine,
            "runtime": {"kind": "tensorrt_llm", "version": engine["version"],
                        "tensorrt": report.versions["tensorrt"], "sm": gpu.sm, "gpu": gpu.name}}


def _gpu_problems(spec: TrtllmBuildSpec, report: DoctorReport) -> list[Problem]:
    if not report.gpus:
        return []
    sm = report.gpus[0].sm
    out = []
    if sm != spec.target_sm:
        out.append(Problem("build.target", f"the engine is for SM{spec.target_sm} but this GPU "
                           f"is SM{sm}; TensorRT engines run only on the SM they were built on",
                           "Build on the target GPU, or set build.target to this GPU."))
    return out


def check_engine_dir(engine_dir: Path) -> dict[str, Any]:
    """config.json (version, pretrained_config, build_config) and rank{N}.engine for every rank
    of its mapping (facts §5); returns what the manifest records."""
    path = Path(engine_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        mapping = cfg["pretrained_config"]["mapping"]
        world = mapping["world_size"]
        version = cfg["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageFailed(f"{engine_dir}: not a TensorRT-LLM engine dir ({exc!r})") from None
    missing = [f"rank{r}.engine" for r in range(world)
               if not (Path(engine_dir) / f"rank{r}.engine").is_file()]
    if missing:
        raise StageFailed(f"{engine_dir}: trtllm-build wrote no {', '.join(missing)}")
    return {"version": version, "world_size": world,
            "files": sorted(p.name for p in Path(engine_dir).glob("rank*.engine"))}


# --- the runtime -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One generate call; nothing falls back to ModelRunnerCpp's defaults (max_new_tokens=1,
    no end_id). temperature 0 is greedy (top_k=1)."""

    max_new_tokens: int
    end_id: int
    pad_id: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def kwargs(self, streaming: bool) -> dict[str, Any]:
        greedy = self.temperature == 0.0
        return {"max_new_tokens": self.max_new_tokens, "end_id": self.end_id,
                "pad_id": self.pad_id, "streaming": streaming, "return_dict": True,
                "output_sequence_lengths": True, "num_beams": 1,
                "temperature": 1.0 if greedy else self.temperature,
                "top_k": 1 if greedy else self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "random_seed": self.seed}


class TrtllmRunner:
    """ModelRunnerCpp with the generate arguments set explicitly and the prompt sliced off.
    To the runner it is a generating runtime (`stream`), not a StepModel: the C++ executor owns
    the KV cache and the sampling loop."""

    runtime = "tensorrt_llm"

    def __init__(self, runner: Any, limits: dict[str, int] | None = None) -> None:
        self.runner = runner
        limits = limits or {}
        self.max_batch_size = limits.get("max_batch_size", 1)
        self.max_seq_len = limits.get("max_seq_len", 2048)
        self.vocab_size = limits.get("vocab_size", 0)

    def generate(self, prompts: list[list[int]], request: Request) -> list[list[int]]:
        """Generated token ids per prompt (output_ids[b, 0, input_len:sequence_length])."""
        out = self.runner.generate(self._inputs(prompts), **request.kwargs(streaming=False))
        return _generated(out, prompts)

    def stream(self, prompts: list[list[int]], request: Request):
        """Yields the generated ids so far per prompt after every decoding step."""
        for out in self.runner.generate(self._inputs(prompts), **request.kwargs(streaming=True)):
            if out:  # ranks other than 0 receive nothing (facts §12)
                yield _generated(out, prompts)

    @staticmethod
    def _inputs(prompts: list[list[int]]) -> list[Any]:
        import torch

        return [torch.tensor(p, dtype=torch.int32) for p in prompts]


def _generated(out: dict[str, Any], prompts: list[list[int]]) -> list[list[int]]:
    ids, lengths = out["output_ids"], out["sequence_lengths"]
    return [ids[b, 0, len(p):int(lengths[b, 0])].tolist() for b, p in enumerate(prompts)]


def load_runner(engine_dir: Path, *, kv_cache_free_gpu_memory_fraction: float = 0.7
                ) -> TrtllmRunner:
    """ModelRunnerCpp.from_dir for an engine built here; refuses a missing or mismatched
    tensorrt_llm and an engine from another version (facts §14.4). 0.7 leaves room for other
    processes on a 12 GB card (upstream takes 0.9 of free memory)."""
    report = doctor()
    if report.problems:
        raise StageFailed("trtllm backend: cannot load an engine here.\n" + report.render())
    engine = check_engine_dir(engine_dir)
    if engine["version"] != report.versions["tensorrt_llm"]:
        raise BadInput([Problem("", f"engine built by tensorrt_llm {engine['version']}, this is "
                                f"{report.versions['tensorrt_llm']}; engines are tied to the "
                                "version that built them", "Rebuild it: build-engine build "
                                "RECIPE --force build_trtllm.", str(engine_dir))])
    from tensorrt_llm.runtime import ModelRunnerCpp

    runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=mpi_rank(),
                                     kv_cache_free_gpu_memory_fraction=
                                     kv_cache_free_gpu_memory_fraction)
    cfg = json.loads((Path(engine_dir) / "config.json").read_text())
    build, pretrained = cfg.get("build_config", {}), cfg.get("pretrained_config", {})
    return TrtllmRunner(runner, {"max_batch_size": build.get("max_batch_size", 1),
                                 "max_seq_len": build.get("max_seq_len", 2048),
                                 "vocab_size": pretrained.get("vocab_size", 0)})


def mpi_rank() -> int:
    """This process's rank under mpirun (tp*pp > 1 engines need one process per GPU; facts
    §12: `rank` must equal the MPI rank, and only rank 0 receives outputs)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> TrtllmRunner:
    """backends.RUNTIMES entry (GPU machines with TensorRT-LLM 1.2.1 only)."""
    return load_runner(Path(engine_dir))
