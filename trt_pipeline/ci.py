"""CI support: which recipes a change affects (a GitHub Actions matrix), and re-checking a
published engine dir against its manifest, the installed versions and a short generation.

Affected means (`affected_recipes`): the recipe file changed; a file it extends changed; a file in
its model source dir changed (a local dir inside the repo; such files count as model files only,
never as code); pyproject.toml changed (vendor pins are in every cache key); Dockerfile.ngc changed
(trtllm recipes: their image); or a file under trt_pipeline/ changed: every recipe, except for
the backend-only paths of BACKEND_CODE, which affect only the recipes of those backends.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from . import manifest
from .errors import BadInput, PipelineError, Problem, bad_input
from .fsio import sha256_file

CODE_DIR = "trt_pipeline/"
ALL_BACKENDS = ("onnx", "rtx", "trtllm")
# Paths under trt_pipeline/ that only some backends' builds run; rtx engines are built from the
# ONNX lowering, so it affects both.
BACKEND_CODE: dict[str, tuple[str, ...]] = {
    "trt_pipeline/backends/rtx/": ("rtx",),
    "trt_pipeline/stages/build_rtx.py": ("rtx",),
    "trt_pipeline/backends/trtllm.py": ("trtllm",),
    "trt_pipeline/stages/build_trtllm.py": ("trtllm",),
    "trt_pipeline/backends/onnx/": ("onnx", "rtx"),
    "trt_pipeline/stages/lower.py": ("onnx", "rtx"),
}
BUILD_FILES: dict[str, tuple[str, ...]] = {
    "pyproject.toml": ALL_BACKENDS,
    "Dockerfile.ngc": ("trtllm",),
}
# rtx engines build without a GPU (and run on ONNX Runtime there); trtllm-build needs one.
RUNNERS = {"onnx": "cpu", "rtx": "cpu", "trtllm": "gpu"}
# Files an engine dir holds beside those its manifest lists.
UNLISTED_OK = (manifest.MANIFEST,)
# Modules a runtime kind needs here; tensorrt_rtx engines fall back to ONNX Runtime without a GPU.
RUNTIME_MODULES: dict[str, tuple[str, ...]] = {
    "reference": ("torch",),
    "onnxruntime": ("onnxruntime",),
    "tensorrt_rtx": ("onnxruntime",),
    "tensorrt_llm": ("tensorrt_llm",),
}
SMOKE_PROMPT = "ROMEO:"
SMOKE_TOKENS = 4


class CheckFailed(PipelineError):
    """`build-engine check` found a problem with an engine dir (exit 1)."""


# --- which recipes a change affects ------------------------------------------------------------


@dataclass(frozen=True)
class _RecipeInfo:
    path: Path  # as found under the recipe dir
    name: str
    backend: str
    target: str
    chain: tuple[Path, ...]  # resolved: the file, then each file it extends
    source: Path | None  # resolved local model dir


def affected_recipes(recipe_dir: Path, changed_files: list[str] | None,
                     repo_root: Path | None = None) -> list[dict[str, str]]:
    """Matrix entries of the recipes under recipe_dir that the changed files (paths relative to
    repo_root, as git prints them) affect; all of them when changed_files is None."""
    return [entry for entry, _ in select_recipes(recipe_dir, changed_files, repo_root)]


def select_recipes(recipe_dir: Path, changed_files: list[str] | None, repo_root: Path | None
                   ) -> list[tuple[dict[str, str], str]]:
    """(matrix entry, why it is affected) for each affected recipe, by recipe path."""
    recipes = _read_recipes(Path(recipe_dir))
    out = []
    for info in recipes:
        why = "every recipe (no --changed-since)" if changed_files is None else \
            _why(info, recipes, [c.strip().removeprefix("./") for c in changed_files],
                 Path(repo_root or ".").resolve())
        if why:
            out.append(({"recipe": info.path.as_posix(), "name": info.name,
                         "backend": info.backend, "target": info.target,
                         "runner": RUNNERS[info.backend]}, why))
    return out


def _why(info: _RecipeInfo, recipes: list[_RecipeInfo], changed: list[str], root: Path
         ) -> str | None:
    chain = [_rel(p, root) for p in info.chain]
    for i, rel in enumerate(chain):
        if rel in changed:
            return f"{rel} changed" if i == 0 else f"it extends {rel}, which changed"
    model_dirs = {r for r in (_rel(x.source, root) for x in recipes if x.source) if r}
    own = _rel(info.source, root) if info.source else None
    for c in changed:
        home = next((d for d in model_dirs if c.startswith(d + "/")), None)
        if home is not None:
            if home == own:
                return f"its model source {c} changed"
            continue
        if info.backend in BUILD_FILES.get(c, ()):
            return f"{c} changed"
        if c.startswith(CODE_DIR):
            only = next((b for p, b in BACKEND_CODE.items() if c == p or
                         (p.endswith("/") and c.startswith(p))), ALL_BACKENDS)
            if info.backend in only:
                return f"code {c} changed"
    return None


def _read_recipes(recipe_dir: Path) -> list[_RecipeInfo]:
    """Every recipe under recipe_dir, validated; a file that does not load is an error unless
    another recipe extends it (a partial base)."""
    from .recipe.load import load_recipe

    if not recipe_dir.is_dir():
        raise bad_input("RECIPE_DIR", f"{recipe_dir} is not a directory",
                        "Pass the folder of recipes, e.g. recipes.")
    files = sorted(recipe_dir.rglob("*.yaml"))
    chains = {f: _extends_chain(f) for f in files}
    bases = {p for chain in chains.values() for p in chain[1:]}
    out, problems = [], []
    for f in files:
        try:
            r = load_recipe(f).recipe
        except BadInput as exc:
            if chains[f][0] not in bases:
                problems += exc.problems
            continue
        source = Path(r.model.source)
        out.append(_RecipeInfo(f, r.name, r.build.backend, r.build.target, chains[f],
                               source.resolve() if source.is_dir() else None))
    names = [i.name for i in out]
    for info in out:
        if names.count(info.name) > 1:
            problems.append(Problem("name", f"{info.name!r} is the name of "
                                    f"{names.count(info.name)} recipes; each publishes "
                                    f"engines/{info.name}/", "Give each recipe its own name.",
                                    str(info.path)))
    if problems:
        raise BadInput(problems, str(recipe_dir))
    return out


def _extends_chain(path: Path) -> tuple[Path, ...]:
    """The recipe file and the files it extends, resolved; stops where load_recipe would fail."""
    chain = [path.resolve()]
    while True:
        try:
            data = yaml.safe_load(chain[-1].read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            break
        parent = data.get("extends") if isinstance(data, dict) else None
        if not isinstance(parent, str):
            break
        nxt = (chain[-1].parent / parent).resolve()
        if nxt in chain or not nxt.is_file():
            break
        chain.append(nxt)
    return tuple(chain)


def _rel(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=120)
    except FileNotFoundError:
        raise bad_input("--changed-since", "git is not installed", "Install git, or omit "
                        "--changed-since to list every recipe.") from None


def changed_since(ref: str, repo_root: Path) -> list[str]:
    """Files changed between the merge base of REF and HEAD, plus uncommitted and untracked
    ones, relative to the repo root."""
    fix = ("Pass a branch, tag or commit that exists here (in GitHub Actions, check out with "
           "fetch-depth: 0), or omit --changed-since to list every recipe.")
    if not ref.strip():
        raise bad_input("--changed-since", "empty ref", fix)
    if _git(repo_root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode:
        raise bad_input("--changed-since", f"{ref!r} is not a commit in {repo_root}", fix)
    names: set[str] = set()
    for args in (("diff", "--name-only", "-z", f"{ref}...HEAD"),
                 ("diff", "--name-only", "-z", "HEAD"),
                 ("ls-files", "--others", "--exclude-standard", "-z")):
        res = _git(repo_root, *args)
        if res.returncode:
            raise bad_input("--changed-since", f"git {' '.join(args)} failed: "
                            f"{res.stderr.strip()}", fix)
        names.update(n for n in res.stdout.split("\0") if n)
    return sorted(names)


@click.command(name="matrix")
@click.argument("recipe_dir", type=click.Path(path_type=Path))
@click.option("--changed-since", "ref", metavar="REF", default=None,
              help="Only recipes that changes since REF (merge base ... HEAD, plus uncommitted "
                   "files) affect.")
def matrix_command(recipe_dir: Path, ref: str | None) -> None:
    """Print a GitHub Actions matrix ({"include": [...]}) of the recipes in RECIPE_DIR."""
    root = changed = None
    if ref is not None:
        res = _git(recipe_dir, "rev-parse", "--show-toplevel")
        if res.returncode:
            raise bad_input("--changed-since", f"{recipe_dir} is not in a git repository "
                            f"({res.stderr.strip()})", "Omit --changed-since for every recipe.")
        root = Path(res.stdout.strip())
        changed = changed_since(ref, root)
    picked = select_recipes(recipe_dir, changed, root)
    for entry, why in picked:
        click.echo(f"{entry['recipe']}: {why}", err=True)
    click.echo(json.dumps({"include": [entry for entry, _ in picked]}))


# --- re-checking an engine dir ------------------------------------------------------------------


@dataclass(frozen=True)
class CheckReport:
    engine_dir: str
    recipe: str
    backend: str
    files: int  # files whose size and sha256 were verified
    problems: tuple[Problem, ...]
    smoke: dict[str, Any] | None  # runtime, token ids and text of the smoke generation
    smoke_skipped: str | None  # why it did not run

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_engine(engine_dir: Path) -> CheckReport:
    """Files vs manifest (size, sha256, nothing unlisted), recorded vs installed versions, and
    a few greedy tokens through Runner where the engine's runtime exists on this machine.
    An engine dir without a readable engine manifest is a BadInput."""
    engine_dir = Path(engine_dir)
    m = manifest.read_engine_manifest(engine_dir)
    rebuild = f"build-engine build {engine_dir / 'recipe.yaml'}"
    problems = _file_problems(engine_dir, m, f"Rebuild it: {rebuild} --force all.")
    problems += _version_problems(m, rebuild)
    smoke, skipped = None, "the engine files do not match the manifest"
    if not problems or all(p.path.startswith("versions.") for p in problems):
        smoke, skipped, more = _smoke(engine_dir, m.runtime)
        problems += more
    return CheckReport(str(engine_dir), m.recipe, m.backend, len(m.files), tuple(problems),
                       smoke, skipped)


def _file_problems(engine_dir: Path, m: manifest.EngineManifest, fix: str) -> list[Problem]:
    root = engine_dir.resolve()
    out = []

    def add(msg: str) -> None:
        out.append(Problem("manifest.files", msg, fix, str(engine_dir)))

    for f in m.files:
        p = engine_dir / f.path
        if _rel(p, root) is None:
            add(f"{f.path}: outside the engine dir")
        elif p.is_symlink():
            add(f"{f.path}: a symlink (published files are regular files)")
        elif not p.is_file():
            add(f"{f.path}: missing")
        elif p.stat().st_size != f.bytes:
            add(f"{f.path}: {p.stat().st_size} bytes, manifest records {f.bytes}")
        elif (digest := sha256_file(p)) != f.sha256:
            add(f"{f.path}: sha256 {digest[:16]}..., manifest records {f.sha256[:16]}...")
    listed = {f.path for f in m.files} | set(UNLISTED_OK)
    for p in sorted(engine_dir.rglob("*")):
        rel = p.relative_to(engine_dir).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in listed and not rel.startswith(
                f"{manifest.REPORTS_DIR}/"):
            add(f"{rel}: not listed in the manifest")
    return out


def _version_problems(m: manifest.EngineManifest, rebuild: str) -> list[Problem]:
    installed = manifest.package_versions([k for k in m.versions if k != "python"])
    return [Problem(f"versions.{name}", f"built with {want}, installed here: {installed[name]}",
                    f"Rebuild with what is installed: {rebuild} (stage keys include versions, "
                    f"so the stages using {name} rebuild), or install {name} {want}.")
            for name, want in sorted(m.versions.items()) if installed.get(name) != want]


def _smoke(engine_dir: Path, runtime: dict[str, Any]
           ) -> tuple[dict[str, Any] | None, str | None, list[Problem]]:
    from .runner import Runner, SamplingParams

    kind = str(runtime.get("kind"))
    missing = [m for m in RUNTIME_MODULES.get(kind, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"runtime {kind} needs {', '.join(missing)}, not installed here", []
    try:
        runner = Runner.open(engine_dir)
        ids = runner.encode(SMOKE_PROMPT) if runner.tokenizer is not None else [1]
        events = list(runner.generate([ids], SamplingParams(max_new_tokens=SMOKE_TOKENS,
                                                            ignore_eos=True)))
    except BadInput as exc:
        return None, None, [Problem("runtime", p.render(), None, str(engine_dir))
                            for p in exc.problems]
    except Exception as exc:  # a runtime's own error, quoted whole
        return None, None, [Problem("runtime", f"smoke generation failed: {type(exc).__name__}: "
                                    f"{exc}", None, str(engine_dir))]
    tokens = [e.token_id for e in events]
    vocab = runner.model.vocab_size
    problems = []
    if len(tokens) != SMOKE_TOKENS or not all(0 <= t < vocab for t in tokens):
        problems.append(Problem("runtime", f"smoke generation gave {tokens}; expected "
                                f"{SMOKE_TOKENS} token ids below vocab_size {vocab}", None,
                                str(engine_dir)))
    return {"runtime": runner.info.get("runtime"), "prompt": SMOKE_PROMPT, "tokens": tokens,
            "text": "".join(e.text for e in events)}, None, problems


@click.command(name="check")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_command(engine_dir: Path, as_json: bool) -> None:
    """Re-verify ENGINE_DIR: files vs manifest, versions vs installed, a smoke generation.
    Exit 1 when a check fails."""
    report = check_engine(engine_dir)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"{engine_dir}: {report.recipe} ({report.backend}), {report.files} files")
        if report.smoke:
            click.echo(f"  smoke ({report.smoke['runtime']}): {report.smoke['text']!r}")
        elif report.smoke_skipped:
            click.echo(f"  smoke: skipped, {report.smoke_skipped}")
    if not report.ok:
        lines = [f"check failed: {engine_dir}: {len(report.problems)} problem(s)"]
        raise CheckFailed("\n".join(lines + [f"  {p.render()}" for p in report.problems]))
