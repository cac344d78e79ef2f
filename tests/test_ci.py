"""CI: the workflow and its GitLab twin use real subcommands; `matrix` picks the recipes a change
affects (checked on a real git history); `check` passes a fresh engine and fails a tampered one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEFAULT_MODEL, REPO

from trt_pipeline.ci import affected_recipes, check_engine
from trt_pipeline.errors import BadInput

WORKFLOW = REPO / ".github" / "workflows" / "engines.yml"
GITLAB_DOC = REPO / "docs" / "ci-gitlab.md"
# `build-engine SUB` on a command line, or the NGC image (ENTRYPOINT build-engine) given SUB
SUBCOMMAND = re.compile(r"(?:build-engine|\"\$IMAGE\"|\$IMAGE)\s+([a-z][a-z_-]*)(?=\s|$|\")")
# Runs the real entry point; registers matrix/check itself only while cli.py does not yet.
BOOT = ("from trt_pipeline import cli as c\n"
        "from trt_pipeline.ci import check_command, matrix_command\n"
        "for cmd in (matrix_command, check_command):\n"
        "    c.cli.commands.setdefault(cmd.name, cmd)\n"
        "c.main()\n")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


# --- the workflow files --------------------------------------------------------------------------


def subcommands(text: str) -> set[str]:
    return set(SUBCOMMAND.findall(text))


def test_workflow_parses_and_has_the_jobs():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    jobs = wf["jobs"]
    assert set(jobs) == {"test", "affected", "build-cpu", "build-gpu", "bench"}
    runs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in jobs.items()}
    assert "make test" in runs["test"] and "make lint" in runs["test"]
    assert "build-engine matrix recipes --changed-since" in runs["affected"]
    assert any(s.get("with", {}).get("fetch-depth") == 0 for s in jobs["affected"]["steps"])

    cpu = jobs["build-cpu"]
    assert cpu["runs-on"] == "ubuntu-latest" and cpu["needs"] == ["test", "affected"]
    assert "fromJSON(needs.affected.outputs.cpu)" in cpu["strategy"]["matrix"]
    cache = next(s for s in cpu["steps"] if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == "${{ env.TRT_PIPELINE_CACHE }}" and "TRT_PIPELINE_CACHE" in \
        cpu["env"]
    assert "hashFiles(matrix.recipe)" in cache["with"]["key"]
    assert "trt_pipeline/**" in cache["with"]["key"]
    setup = next(s for s in cpu["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"
    assert "build-engine check engines/${{ matrix.name }}" in runs["build-cpu"]
    upload = next(s for s in cpu["steps"] if s.get("uses", "").startswith(
        "actions/upload-artifact") and s.get("if") is None)
    assert upload["with"]["path"] == "engines/${{ matrix.name }}/"

    gpu = jobs["build-gpu"]
    assert gpu["runs-on"] == ["self-hosted", "gpu"]
    assert "fromJSON(needs.affected.outputs.gpu)" in gpu["strategy"]["matrix"]
    assert "docker build -f Dockerfile.ngc" in runs["build-gpu"]
    assert "docker run --rm --gpus all" in runs["build-gpu"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in gpu["if"]

    bench = jobs["bench"]
    assert bench["runs-on"] == ["self-hosted", "gpu"]
    assert "build-engine bench" in runs["bench"] and "$GITHUB_STEP_SUMMARY" in runs["bench"]
    assert {"matrix", "build", "check", "bench"} <= subcommands(WORKFLOW.read_text())


def test_make_targets_the_workflow_calls_exist():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M))
    assert {"test", "lint", "setup"} <= targets


def test_every_subcommand_used_exists_in_the_cli():
    from trt_pipeline.cli import cli as group

    used = subcommands(WORKFLOW.read_text()) | subcommands(GITLAB_DOC.read_text())
    assert {"matrix", "check", "bench", "build"} <= used
    assert used <= set(group.commands), f"not registered in cli.py: {used - set(group.commands)}"
    assert {"matrix", "check", "serve", "bench"} <= set(group.commands)


def gitlab_yaml() -> str:
    return re.search(r"```yaml\n(.*?)```", GITLAB_DOC.read_text(), re.S).group(1)


def test_gitlab_example_parses_and_its_child_pipeline_generator_works(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    ci = yaml.safe_load(gitlab_yaml())
    assert {"test", "plan", "engines", "bench"} <= set(ci)
    assert ci["test"]["script"] == ["make lint", "make test"]
    assert ci["engines"]["trigger"]["include"][0] == {"artifact": "engines.yml", "job": "plan"}
    generator = next(s for s in ci["plan"]["script"] if "python - <<'EOF'" in s)
    code = generator.split("<<'EOF'\n", 1)[1].rsplit("EOF", 1)[0]
    entries = affected_recipes(Path("recipes"), None)
    (tmp_path / "matrix.json").write_text(json.dumps({"include": entries}))
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    child = yaml.safe_load((tmp_path / "engines.yml").read_text())
    assert set(child) == {f"engine:{e['name']}" for e in entries}
    assert child["engine:default"]["script"] == [
        ".venv/bin/build-engine build recipes/default.yaml",
        ".venv/bin/build-engine check engines/default"]
    assert child["engine:default"]["artifacts"]["paths"] == ["engines/default/"]
    trtllm = child["engine:llama-3.2-1b-int4-awq-trtllm"]
    assert trtllm["tags"] == ["gpu"] and "--gpus all" in trtllm["script"][0]
    assert trtllm["script"][1].endswith("check /engines/llama-3.2-1b-int4-awq-trtllm")


# --- which recipes a change affects --------------------------------------------------------------

RECIPES = ("default.yaml", "default-onnx.yaml", "llama-3.2-1b-int4-awq-trtllm.yaml")
OTHER = """\
name: other-onnx
model: {source: ../models/other, dtype: float32}
build: {backend: onnx, target: cpu}
"""
CODE = ("trt_pipeline/plan.py", "trt_pipeline/backends/rtx/build.py",
        "trt_pipeline/backends/trtllm.py", "trt_pipeline/backends/onnx/lower.py",
        "trt_pipeline/stages/build_trtllm.py", "trt_pipeline/server.py")


def make_repo(root: Path) -> Path:
    """A repo shaped like ours: three shipped recipes, one more on its own model dir, a code tree
    and the default model (config only: matrix reads recipes, never weights)."""
    (root / "recipes").mkdir(parents=True)
    for name in RECIPES:
        shutil.copy(REPO / "recipes" / name, root / "recipes" / name)
    (root / "recipes" / "other-onnx.yaml").write_text(OTHER)
    for rel in (*CODE, "trt_pipeline/data/default_model/config.json", "models/other/config.json",
                "README.md", "pyproject.toml", "Dockerfile.ngc"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    return root


ALL = {"default", "default-onnx", "llama-3.2-1b-int4-awq-trtllm", "other-onnx"}


@pytest.mark.parametrize(("changed", "expected"), [
    (["recipes/llama-3.2-1b-int4-awq-trtllm.yaml"], {"llama-3.2-1b-int4-awq-trtllm"}),
    (["recipes/default.yaml"], {"default", "default-onnx"}),  # default-onnx extends it
    (["recipes/default-onnx.yaml"], {"default-onnx"}),
    (["trt_pipeline/data/default_model/config.json"], {"default", "default-onnx"}),
    (["models/other/config.json"], {"other-onnx"}),
    (["trt_pipeline/plan.py"], ALL),
    (["trt_pipeline/server.py"], ALL),
    (["trt_pipeline/backends/rtx/build.py"], {"default"}),
    (["trt_pipeline/backends/onnx/lower.py"], {"default", "default-onnx", "other-onnx"}),
    (["trt_pipeline/backends/trtllm.py"], {"llama-3.2-1b-int4-awq-trtllm"}),
    (["trt_pipeline/stages/build_trtllm.py"], {"llama-3.2-1b-int4-awq-trtllm"}),
    (["pyproject.toml"], ALL),
    (["Dockerfile.ngc"], {"llama-3.2-1b-int4-awq-trtllm"}),
    (["README.md", "tests/test_x.py", "docs/a.md", "recipes/gone.yaml"], set()),
    ([], set()),
])
def test_affected_recipes(tmp_path, changed, expected):
    root = make_repo(tmp_path / "repo")
    entries = affected_recipes(root / "recipes", changed, root)
    assert {e["name"] for e in entries} == expected
    assert entries == sorted(entries, key=lambda e: e["recipe"])


def test_matrix_entries_and_recipe_dir_problems(tmp_path):
    root = make_repo(tmp_path / "repo")
    entries = {e["name"]: e for e in affected_recipes(root / "recipes", None, root)}
    assert set(entries) == ALL
    assert entries["default"] == {"recipe": f"{root / 'recipes'}/default.yaml", "name": "default",
                                  "backend": "rtx", "target": "rtx3060-12gb", "runner": "cpu"}
    assert entries["llama-3.2-1b-int4-awq-trtllm"]["runner"] == "gpu"
    assert entries["default-onnx"]["runner"] == entries["other-onnx"]["runner"] == "cpu"
    # a partial base that other recipes extend is no build of its own
    (root / "recipes" / "base.yaml").write_text("build: {backend: onnx, target: cpu}\n")
    (root / "recipes" / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nmodel: {source: ../models/other}\n")
    names = {e["name"] for e in affected_recipes(root / "recipes", ["recipes/base.yaml"], root)}
    assert names == {"child"}
    # a broken recipe and a duplicate name are errors, all reported at once
    (root / "recipes" / "broken.yaml").write_text("name: broken\nbuild: {backend: nope}\n")
    (root / "recipes" / "twin.yaml").write_text(OTHER)
    with pytest.raises(BadInput) as info:
        affected_recipes(root / "recipes", [], root)
    text = info.value.render()
    assert "build.backend" in text and "model: required key is missing" in text
    assert "'other-onnx' is the name of 2 recipes" in text


def git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def matrix_names(root: Path, *args: str) -> set[str]:
    res = cli("matrix", "recipes", *args, cwd=root)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"include"}
    for e in out["include"]:
        assert (root / e["recipe"]).is_file()
    return {e["name"] for e in out["include"]}


def test_matrix_changed_since_on_a_git_history(tmp_path):
    root = make_repo(tmp_path / "repo")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "base")
    base = git(root, "rev-parse", "HEAD")
    assert matrix_names(root) == ALL
    assert matrix_names(root, "--changed-since", base) == set()

    git(root, "checkout", "-q", "-b", "feature")
    (root / "trt_pipeline/backends/trtllm.py").write_text("# changed\n")
    git(root, "commit", "-qam", "trtllm code")
    assert matrix_names(root, "--changed-since", base) == {"llama-3.2-1b-int4-awq-trtllm"}
    assert matrix_names(root, "--changed-since", "main") == {"llama-3.2-1b-int4-awq-trtllm"}

    (root / "recipes/default.yaml").write_text(
        (root / "recipes/default.yaml").read_text().replace("max_batch_size: 4",
                                                            "max_batch_size: 2"))
    (root / "models/other/tokenizer.json").write_text("{}")  # untracked
    assert matrix_names(root, "--changed-since", base) == {
        "llama-3.2-1b-int4-awq-trtllm", "default", "default-onnx", "other-onnx"}
    # main moved on meanwhile: only what this branch changed counts (merge base ... HEAD)
    git(root, "stash", "-q", "-u")
    git(root, "checkout", "-q", "main")
    (root / "trt_pipeline/plan.py").write_text("# changed on main\n")
    git(root, "commit", "-qam", "main moves")
    git(root, "checkout", "-q", "feature")
    assert matrix_names(root, "--changed-since", "main") == {"llama-3.2-1b-int4-awq-trtllm"}

    for ref in ("no-such-branch", "0" * 40, ""):
        res = cli("matrix", "recipes", "--changed-since", ref, cwd=root)
        assert res.returncode == 2, res.stderr
        assert "--changed-since" in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""


# --- check ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """recipes/default-onnx.yaml (INT4 AWQ, ONNX Runtime) through the executor, published."""
    from trt_pipeline.cache import Cache
    from trt_pipeline.executor import execute
    from trt_pipeline.plan import make_plan
    from trt_pipeline.recipe.load import load_recipe

    root = tmp_path_factory.mktemp("check")
    with pytest.MonkeyPatch.context() as mp:  # the per-test roots do not exist yet
        mp.setenv("TRT_PIPELINE_CACHE", str(root / "cache"))
        mp.setenv("TRT_PIPELINE_ENGINES", str(root / "engines"))
        plan = make_plan(load_recipe(REPO / "recipes" / "default-onnx.yaml"))
        return execute(plan, Cache(root / "cache"), root / "engines").engine_dir


@pytest.fixture
def copy(engine, tmp_path) -> Path:
    """A copy (not hard links) of the engine dir, to tamper with."""
    return Path(shutil.copytree(engine, tmp_path / "default-onnx"))


def test_check_passes_a_fresh_engine(engine):
    report = check_engine(engine)
    assert report.ok, report.problems
    assert report.recipe == "default-onnx" and report.backend == "onnx"
    assert report.files == len(json.loads((engine / "manifest.json").read_text())["files"])
    assert report.smoke["runtime"] == "onnxruntime" and len(report.smoke["tokens"]) == 4
    res = cli("check", str(engine), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True


def test_a_published_onnx_engine_loads_in_onnx_itself(engine):
    """onnx refuses external data with several hard links; the publisher copies it."""
    import onnx

    onnx.checker.check_model(str(engine / "model.onnx"), full_check=True)
    assert onnx.load(str(engine / "model.onnx")).graph.initializer


def problems_of(engine_dir: Path) -> list[str]:
    return [f"{p.path}: {p.message}" for p in check_engine(engine_dir).problems]


def test_check_finds_a_tampered_file_with_its_size_kept(copy):
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    got = problems_of(copy)
    assert len(got) == 1 and got[0].startswith("manifest.files: model.onnx.data: sha256")
    res = cli("check", str(copy))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "model.onnx.data: sha256" in res.stderr and "--force all" in res.stderr


def test_check_finds_missing_truncated_and_unlisted_files(copy):
    (copy / "tokenizer.json").unlink()
    cfg = copy / "generation_config.json"
    cfg.write_bytes(cfg.read_bytes()[:-1])
    (copy / "extra.py").write_text("print('not ours')\n")
    report = check_engine(copy)
    assert sorted(p.message.split(":")[0] for p in report.problems) == [
        "extra.py", "generation_config.json", "tokenizer.json"]
    text = "\n".join(p.message for p in report.problems)
    assert "tokenizer.json: missing" in text and "extra.py: not listed in the manifest" in text
    assert "bytes, manifest records" in text
    assert report.smoke is None and "do not match" in report.smoke_skipped


def test_check_accepts_bench_reports_beside_the_engine(copy):
    """`build --bench` writes reports into engine/bench/: not engine files, not a problem; a
    stray file elsewhere still is."""
    (copy / "bench").mkdir()
    (copy / "bench" / "report.json").write_text("{}")
    (copy / "benchmark.json").write_text("{}")
    assert problems_of(copy) == ["manifest.files: benchmark.json: not listed in the manifest"]


def test_check_finds_version_drift_and_names_the_rebuild(copy):
    path = copy / "manifest.json"
    m = json.loads(path.read_text())
    m["versions"]["onnxruntime"] = "0.0.1"
    path.write_text(json.dumps(m))
    report = check_engine(copy)
    assert [p.path for p in report.problems] == ["versions.onnxruntime"]
    p = report.problems[0]
    assert "built with 0.0.1" in p.message
    assert f"build-engine build {copy / 'recipe.yaml'}" in p.fix
    assert report.smoke is not None  # the engine itself is intact: it still runs


def test_check_refuses_a_dir_that_is_not_an_engine(tmp_path):
    res = cli("check", str(DEFAULT_MODEL))
    assert res.returncode == 2 and "no manifest.json" in res.stderr
    assert "Traceback" not in res.stderr
    assert cli("check", str(tmp_path / "nothing")).returncode == 2
