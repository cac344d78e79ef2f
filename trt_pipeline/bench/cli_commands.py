"""`build-engine serve` and `build-engine bench`: parse, one library call, print results.

cli.py registers both (`cli.add_command(serve)`, `cli.add_command(bench)`). Bench options left
unset take the engine's recipe `bench:` section (saved beside the engine as recipe.yaml), then
that section's schema defaults, so a recipe's numbers and the command agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from ..errors import bad_input
from ..fsio import write_text_atomic
from ..manifest import RECIPE_FILE

# recipe/schema.py BenchSection defaults; restated because bench must not import the recipe layer
BENCH_DEFAULTS: dict[str, Any] = {"workload": "synthetic", "isl": 128, "osl": 64,
                                  "isl_stddev": 0.0, "osl_stddev": 0.0, "concurrency": (1,),
                                  "requests": 8, "warmup": 2, "seed": 0}


@click.command()
@click.argument("engine_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=None,
              help="Most requests per batch. Default: the runtime's limit.")
@click.option("--batch-window-ms", type=click.FloatRange(0, 10_000), default=0.0,
              show_default=True,
              help="How long a request that finds the engine idle waits for others to share "
                   "its batch. With static batching and 0, closed-loop clients at concurrency "
                   "> 1 often start a batch alone and the rest wait for all of it.")
@click.option("--batching", type=click.Choice(["auto", "inflight", "static"]), default="auto",
              show_default=True,
              help="inflight: requests join and leave a running batch between decode steps "
                   "(ONNX Runtime, reference); static: a batch runs to its end before the next "
                   "starts; auto: inflight where the runtime can.")
@click.option("--served-model-name", default=None,
              help="The model id clients send and /v1/models lists. Default: the engine's "
                   "recipe name (a checkpoint dir: its directory name).")
def serve(engine_dir: Path, host: str, port: int, max_batch_size: int | None,
          batch_window_ms: float, batching: str, served_model_name: str | None) -> None:
    """Serve ENGINE_DIR over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/...).
    ENGINE_DIR may also be a TensorRT-LLM checkpoint dir, run by the CPU reference model."""
    from ..server import serve as run_server

    click.echo(f"serving {engine_dir} at http://{host}:{port}/v1", err=True)
    run_server(engine_dir, host, port, max_batch_size, batch_window_ms / 1e3, served_model_name,
               inflight=INFLIGHT[batching])


INFLIGHT: dict[str, bool | None] = {"auto": None, "inflight": True, "static": False}


def _levels(_: click.Context, __: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        levels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected integers like 1,4,16") from None
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        raise click.BadParameter(f"{value!r}: expected distinct integers >= 1")
    return levels


@click.command()
@click.argument("engine_dir", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--endpoint", default=None, metavar="URL",
              help="Bench a running OpenAI-compatible server (ENGINE_DIR, if given, is the engine "
                   "it serves: tokenizer and metadata).")
@click.option("--api", type=click.Choice(["completions", "chat"]), default="completions",
              show_default=True, help="With --endpoint: which API to drive.")
@click.option("--model", default=None,
              help="With --endpoint: the model id to send (default: the server's first "
                   "/v1/models entry).")
@click.option("--workload", default=None, help="synthetic, a trtllm-bench .jsonl, or a .txt.")
@click.option("--isl", type=click.IntRange(1), default=None, help="Input tokens per request.")
@click.option("--osl", type=click.IntRange(1), default=None, help="Output tokens (exact).")
@click.option("--concurrency", callback=_levels, default=None, help="Levels, e.g. 1,4,16.")
@click.option("--requests", type=click.IntRange(1), default=None, help="Measured per level.")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Unrecorded, per level.")
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Open loop: Poisson arrivals at R requests/s (concurrency caps in flight).")
@click.option("--seed", type=click.IntRange(0), default=None, help="Workload and arrivals.")
@click.option("--max-batch-size", type=click.IntRange(1), default=None,
              help="In-process: most requests per batch (default: the runtime's limit).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Default: bench-results/<engine>/.")
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="A.json B.json", help="Compare two reports; runs nothing.")
def bench(engine_dir: Path | None, endpoint: str | None, api: str, model: str | None,
          compare: tuple[Path, Path] | None, out_dir: Path | None, rate: float | None,
          max_batch_size: int | None, **given: Any) -> None:
    """Measure TTFT, ITL, E2E and throughput over a concurrency sweep; write report.json,
    report.md and plots; print the Markdown and the paths.

    Unset options take ENGINE_DIR's recipe `bench:` section, else synthetic ISL 128 / OSL 64,
    concurrency 1, 8 requests, 2 warm-up, seed 0. Requests are greedy with EOS ignored, so every
    one produces exactly its output length."""
    from . import report as rep

    if compare:
        click.echo(rep.compare(rep.load_json(compare[0]), rep.load_json(compare[1])))
        return
    if engine_dir is None and endpoint is None:
        raise bad_input("ENGINE_DIR", "required (or --endpoint URL)",
                        "Pass an engine dir, --endpoint URL, or --compare A.json B.json.")
    markdown, paths = bench_engine(engine_dir, endpoint, api, given, rate, max_batch_size,
                                   out_dir, model)
    click.echo(markdown)
    for p in paths:
        click.echo(str(p))


def bench_engine(engine_dir: Path | None, endpoint: str | None = None, api: str = "completions",
                 given: dict[str, Any] | None = None, rate: float | None = None,
                 max_batch_size: int | None = None, out_dir: Path | None = None,
                 model: str | None = None) -> tuple[str, list[Path]]:
    """Run the sweep and write report.json, report.md and the plots; (markdown, paths).
    Also what `build-engine build --bench` runs on the engine it just published."""
    from . import report as rep

    opts = {**BENCH_DEFAULTS, **(_recipe_bench(engine_dir) if engine_dir else {}),
            **{k: v for k, v in (given or {}).items() if v is not None}}
    report = _run(engine_dir, endpoint, api, opts, rate, max_batch_size, model)
    name = str(report.metadata.get("engine", "endpoint"))
    out_dir = out_dir or Path("bench-results") / name
    rep.write_json(report, out_dir / "report.json")
    markdown = rep.markdown(report)
    write_text_atomic(out_dir / "report.md", markdown + "\n")
    plots = rep.plot(report, out_dir)
    return markdown, [out_dir / "report.json", out_dir / "report.md", *plots]


def _run(engine_dir: Path | None, endpoint: str | None, api: str, opts: dict[str, Any],
         rate: float | None, max_batch_size: int | None, model: str | None) -> Any:
    from ..runner import Runner
    from .measure import sweep

    runner = Runner.open(engine_dir) if engine_dir else None
    requests = _workload(runner, opts)
    target: Any = endpoint or runner
    return sweep(target, requests, opts["concurrency"], opts["warmup"], rate, opts["seed"],
                 api=api, model=model, max_batch_size=max_batch_size, engine_dir=engine_dir)


def _workload(runner: Any, opts: dict[str, Any]) -> list[Any]:
    from . import workload as wl

    kind = str(opts["workload"])
    if kind.endswith(".jsonl"):
        return wl.load_jsonl(kind)
    if runner is None:
        raise bad_input("--workload", f"{kind} needs the engine's tokenizer",
                        "Pass ENGINE_DIR with --endpoint, or a .jsonl workload.")
    if kind == "synthetic":
        return wl.synthetic(opts["requests"], opts["isl"], opts["osl"], opts["isl_stddev"],
                            opts["osl_stddev"], runner.model.vocab_size, opts["seed"])
    if kind.endswith(".txt"):
        return wl.from_text(kind, opts["isl"], opts["osl"], opts["requests"], runner.encode,
                            opts["seed"])
    raise bad_input("--workload", f"got {kind!r}", "Use synthetic, FILE.jsonl or FILE.txt.")


def _recipe_bench(engine_dir: Path) -> dict[str, Any]:
    path = engine_dir / RECIPE_FILE
    if not path.is_file():
        return {}
    section = (yaml.safe_load(path.read_text()) or {}).get("bench") or {}
    return {k: tuple(v) if k == "concurrency" else v for k, v in section.items()
            if k in BENCH_DEFAULTS and v is not None}
