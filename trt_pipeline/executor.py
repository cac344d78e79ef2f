"""Run a Plan through the cache: resolve keys, reuse or build each stage, publish the engine dir."""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import memory_fit
from .cache import Cache
from .checkpoint.io import copy_tokenizer
from .errors import BadInput, StageFailed
from .fsio import link_or_copy, replace_dir, write_text_atomic
from .manifest import (
    MANIFEST,
    RECIPE_FILE,
    EngineManifest,
    Manifest,
    StageRecord,
    host_name,
    list_files,
    now_iso,
    read_manifest,
    write_manifest,
)
from .plan import Plan, StageSpec
from .stages import STAGES, Artifact, StageContext
from .stages.base import code_hash, params_dict, stage_key

log = logging.getLogger(__name__)
STAGE_LOG = "stage.log"
READ_ONLY = 0o444


def default_engines_root() -> Path:
    return Path(os.environ.get("TRT_PIPELINE_ENGINES", "engines"))


@dataclass
class Resolved:
    spec: StageSpec
    key: str
    cached: bool
    dir: Path
    inputs: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    engine_dir: Path
    stages: list[StageRecord]
    metrics: dict[str, dict[str, Any]]


def resolve(plan: Plan, cache: Cache) -> list[Resolved]:
    """Every stage's key and whether the cache already holds it; runs nothing but the source
    fingerprint (hashing the model files)."""
    keys: dict[str, str] = {}
    out: list[Resolved] = []
    for spec in plan.specs:
        stage = STAGES[spec.stage]
        if stage.fingerprint is not None:
            key, path, metrics = stage.fingerprint(spec.params, cache.root)
            out.append(Resolved(spec, key, True, path, metrics=metrics))
        else:
            inputs = {role: keys[src] for role, src in spec.inputs.items()}
            key, versions = stage_key(stage, spec.params, inputs)
            manifest = cache.lookup(stage.name, key)
            out.append(Resolved(spec, key, manifest is not None,
                                cache.artifact_dir(stage.name, key), inputs, versions,
                                manifest.metrics if manifest else {}))
        keys[spec.stage] = key
    return out


def execute(plan: Plan, cache: Cache, engines_root: Path, force: tuple[str, ...] = ()
            ) -> BuildResult:
    """Build what is missing (or forced), then publish engines/<recipe name>/ atomically."""
    artifacts: dict[str, Artifact] = {}
    records: list[StageRecord] = []
    for r in resolve(plan, cache):
        name = r.spec.stage
        t0 = time.perf_counter()
        log.info("%s %s ...", name, r.key)
        if STAGES[name].fingerprint is None:
            with cache.lock(name, r.key):
                manifest = None if name in force or "all" in force else cache.lookup(name, r.key)
                r.cached = manifest is not None
                if manifest is None:
                    manifest = _run_stage(plan, r, artifacts, cache)
                r.metrics = manifest.metrics
        artifacts[name] = Artifact(name, r.key, r.dir, r.metrics)
        seconds = round(time.perf_counter() - t0, 3)
        records.append(StageRecord(stage=name, key=r.key, cached=r.cached, seconds=seconds))
        log.info("%s %s %s in %.1f s", name, r.key, "cached" if r.cached else "built", seconds)
    engine_dir = publish(plan, artifacts, records, engines_root)
    return BuildResult(engine_dir, records, {a.stage: a.metrics for a in artifacts.values()})


def _run_stage(plan: Plan, r: Resolved, artifacts: dict[str, Artifact], cache: Cache) -> Manifest:
    stage = STAGES[r.spec.stage]
    assert stage.run is not None
    inputs = {role: artifacts[src] for role, src in r.spec.inputs.items()}
    root_logger = logging.getLogger("trt_pipeline")
    with cache.staging(stage.name, r.key) as tmp:
        handler = logging.FileHandler(tmp / STAGE_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root_logger.addHandler(handler)
        started, t0 = now_iso(), time.perf_counter()
        try:
            metrics = stage.run(StageContext(tmp, r.spec.params, inputs, log)) or {}
        except BadInput:
            raise
        except Exception as exc:
            kept = _keep_log(cache, stage.name, r.key, tmp / STAGE_LOG)
            raise StageFailed(
                f"stage {stage.name} (key {r.key}, backend {plan.loaded.recipe.build.backend}, "
                f"target {plan.target.name}) failed: {type(exc).__name__}: {exc}\n"
                f"  log: {kept}\n  rerun just this stage: build-engine build "
                f"{plan.loaded.path or plan.name} --force {stage.name}") from exc
        finally:
            root_logger.removeHandler(handler)
            handler.close()
        metrics["process_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        manifest = Manifest(
            stage=stage.name, key=r.key, inputs=r.inputs, params=params_dict(r.spec.params),
            versions=r.versions, code=code_hash(stage.code), host=host_name(), started=started,
            finished=now_iso(), seconds=round(time.perf_counter() - t0, 3),
            files=list_files(tmp), metrics=metrics)
        write_manifest(tmp, manifest)
    return manifest


def _keep_log(cache: Cache, stage: str, key: str, log_file: Path) -> Path:
    logs = cache.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dest = logs / f"{stage}-{key}.log"
    if log_file.is_file():
        shutil.copy2(log_file, dest)
    return dest


def publish(plan: Plan, artifacts: dict[str, Artifact], records: list[StageRecord],
            engines_root: Path) -> Path:
    """engines/<name>/ = the final artifact's files + tokenizer + resolved recipe + manifest,
    assembled in a temp dir and swapped in under a lock: readers never see a partial dir."""
    final = artifacts[plan.engine_stage]
    engines_root.mkdir(parents=True, exist_ok=True)
    target = engines_root / plan.name
    lock_path = engines_root / f".{plan.name}.lock"
    with lock_path.open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        tmp = engines_root / f".{plan.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for f in sorted(final.dir.rglob("*")):
                rel = f.relative_to(final.dir)
                if f.is_file() and rel.as_posix() not in (MANIFEST, STAGE_LOG):
                    link_or_copy(f, tmp / rel)
                    # engine files share their inode with the cache: read-only, so an edit in
                    # place cannot silently corrupt a cached artifact
                    (tmp / rel).chmod(READ_ONLY)
            copy_tokenizer(artifacts["source"].dir, tmp)
            write_text_atomic(tmp / RECIPE_FILE, plan.loaded.to_yaml())
            versions: dict[str, str] = {}
            for a in artifacts.values():
                m = read_manifest(a.dir)
                versions.update(m.versions if m else {})
            manifest = EngineManifest(
                recipe=plan.name, backend=plan.loaded.recipe.build.backend,
                target=plan.target.name, sm=plan.target.sm,
                runtime=final.metrics.get("runtime", {"stage": final.stage}),
                stages=records, versions=versions, created=now_iso(), files=list_files(tmp),
                metrics=_engine_metrics(plan, artifacts))
            write_manifest(tmp, manifest)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _engine_metrics(plan: Plan, artifacts: dict[str, Artifact]) -> dict[str, Any]:
    """Every stage's metrics, and the planner's estimate beside TensorRT's own memory figures."""
    out: dict[str, Any] = {a.stage: a.metrics for a in artifacts.values() if a.stage != "source"}
    if plan.estimate is not None:
        fit: dict[str, Any] = {"estimate": plan.estimate.as_dict()}
        trt = artifacts[plan.engine_stage].metrics.get("trt")
        if trt:
            fit["vs_tensorrt"] = memory_fit.compare(plan.estimate, trt)
        out["memory_fit"] = fit
    return out
