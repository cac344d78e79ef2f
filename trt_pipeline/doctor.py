"""`build-engine doctor`: what this machine can build and run, backend by backend."""

from __future__ import annotations

from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def report() -> tuple[str, bool]:
    """(text, ok): ok means nothing a recipe here could ask for is broken. The trtllm backend is
    expected to be absent outside its container, so its problems are listed but fail only where
    tensorrt_llm is installed (a wrong version or driver there breaks every trtllm recipe)."""
    from .backends.rtx.engine import find_gpu, installed
    from .backends.trtllm import doctor as trtllm_doctor

    lines = [f"trt-pipeline {_version('trt-pipeline')}, torch {_version('torch')}, "
             f"transformers {_version('transformers')}"]
    ort = _version("onnxruntime")
    lines.append(f"onnx backend: onnx {_version('onnx')}, onnxruntime {ort} "
                 f"({'ready' if ort != 'absent' else 'pip install trt-pipeline[onnx]'})")
    version, sms = installed()
    gpu = find_gpu()
    if version is None:
        lines.append("rtx backend: tensorrt_rtx absent (pip install 'trt-pipeline[rtx]')")
    else:
        runs = gpu is not None and gpu.sm in sms
        where = (f"runs engines on {gpu.name} (sm{gpu.sm})" if runs else
                 f"cannot run engines on {gpu.name} (sm{gpu.sm}); ONNX Runtime runs their graph"
                 if gpu else "no GPU: builds engines; ONNX Runtime runs their graph")
        lines.append(f"rtx backend: tensorrt_rtx {version}, builds sm{', sm'.join(map(str, sms))};"
                     f" {where}")
    trtllm = trtllm_doctor()
    lines.append(trtllm.render())
    ok = ort != "absent" and version is not None and (
        trtllm.ok or trtllm.versions["tensorrt_llm"] == "absent")
    return "\n".join(lines), ok
