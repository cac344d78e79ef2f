"""STYLE.md §2 kept true by an ast walk: data flows one way, vendor packages stay in backends/,
and `build-engine validate` runs without torch or any engine package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "trt_pipeline"
VENDORS = {"tensorrt_llm": "backends/trtllm.py", "tensorrt_rtx": "backends/rtx/",
           "tensorrt_rtx_bindings": "backends/rtx/", "tensorrt": "backends/"}
# module prefix -> packages it must not import (relative to trt_pipeline)
FORBIDDEN = {
    "stages/": ("recipe", "plan", "executor", "cli"),
    "backends/": ("stages", "recipe", "plan", "executor", "cli"),
    "runner/": ("recipe", "plan", "stages", "executor", "cli"),
    "bench/": ("recipe", "plan", "stages", "executor"),
    "checkpoint/": ("families", "quant", "reference", "backends", "stages", "recipe", "plan"),
    "reference/": ("families", "quant", "backends", "stages", "recipe", "plan"),
    "quant/": ("families", "backends", "stages", "recipe", "plan"),
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module top level) for every import in a file."""
    rel_pkg = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_pkg[: len(rel_pkg) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, id(node) in top))
    return out


def files() -> list[tuple[str, Path]]:
    return [(p.relative_to(PKG).as_posix(), p) for p in sorted(PKG.rglob("*.py"))]


def test_vendor_packages_only_in_their_backend_and_inside_functions():
    bad = []
    for rel, path in files():
        for mod, at_top in imports(path):
            root = mod.split(".")[0]
            if root in VENDORS and (not rel.startswith(VENDORS[root]) or at_top):
                bad.append(f"{rel}: {mod} ({'top level' if at_top else 'function'})")
    assert not bad, bad


def test_data_flows_one_way():
    bad = []
    for rel, path in files():
        for prefix, banned in FORBIDDEN.items():
            if not rel.startswith(prefix):
                continue
            for mod, _ in imports(path):
                parts = mod.split(".")
                if parts[0] == "trt_pipeline" and len(parts) > 1 and parts[1] in banned:
                    bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_validate_needs_no_torch_or_engine_package():
    code = ("import sys, trt_pipeline.cli, trt_pipeline.plan\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'onnx', 'onnxruntime',"
            " 'tensorrt_rtx', 'tensorrt_llm', 'numpy') if m in sys.modules]\n"
            "print(','.join(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""
