"""`build-engine`: parse, make one call into the library, print. Imported by nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .cache import Cache
from .console import err_console, setup_logging
from .errors import BadInput, PipelineError, bad_input
from .manifest import REPORTS_DIR
from .recipe.load import load_recipe

out = Console(highlight=False, soft_wrap=True)


class DefaultToBuild(click.Group):
    """`build-engine RECIPE ...` is short for `build-engine build RECIPE ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        i = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if i is not None and args[i] not in self.commands:
            args = [*args[:i], "build", *args[i:]]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToBuild, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings only, no progress bars.")
@click.version_option(package_name="trt-pipeline")
def cli(verbose: bool, quiet: bool) -> None:
    """Build, verify and benchmark LLM inference engines from one YAML recipe.

    RECIPE arguments take overrides after them: key.path=value or ~key.path
    (e.g. build.max_batch_size=4 quantize.method=rtn).
    """
    setup_logging(verbose, quiet)


recipe_arg = click.argument("recipe", type=click.Path(path_type=Path))
overrides_arg = click.argument("overrides", nargs=-1)


@cli.command()
@recipe_arg
@overrides_arg
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe and its model without building anything."""
    from .plan import make_plan

    plan = make_plan(load_recipe(recipe, overrides))
    r = plan.loaded.recipe
    out.print(f"ok  {r.name}: {plan.family.name} {plan.desc.architecture}, "
              f"backend {r.build.backend}, target {plan.target.name}")


@cli.command()
@recipe_arg
@overrides_arg
@click.option("--backend", type=click.Choice(["onnx", "rtx", "trtllm"]), default=None,
              help="Shorthand for the override build.backend=...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(recipe: Path, overrides: tuple[str, ...], backend: str | None, as_json: bool) -> None:
    """Show the stages, their cache keys, which are cached, the memory estimate for the target
    and, for trtllm, the exact trtllm-build command."""
    from .executor import resolve
    from .plan import make_plan
    from .plan_report import plan_summary

    if backend:
        overrides = (*overrides, f"build.backend={backend}")
    p = make_plan(load_recipe(recipe, overrides))
    summary = plan_summary(p, resolve(p, Cache()))
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"{p.name}: {p.family.name} -> {p.loaded.recipe.build.backend} "
                  f"({p.target.name})")
    for col in ("stage", "key", "status", "where"):
        table.add_column(col)
    for row in summary["stages"]:
        table.add_row(row["stage"], row["key"], "cached" if row["cached"] else "to build",
                      row["dir"])
    out.print(table)
    if summary.get("memory"):
        m = summary["memory"]
        out.print(f"memory on {p.target.name}: {m['total_gib']:.2f} GiB of {m['usable_gib']:.2f} "
                  f"GiB usable (weights {m['weights_gib']:.2f}, KV cache {m['kv_copies']} x "
                  f"{m['kv_cache_gib']:.2f}, activations {m['activations_gib']:.2f}, overhead "
                  f"{m['overhead_gib']:.2f})")
    if summary.get("command"):
        out.print("trtllm-build command:\n  " + " ".join(summary["command"]))
    for note in p.notes:
        out.print(f"note: {note}")


@cli.command()
def doctor() -> None:
    """What this machine can build and run: engine packages, GPUs, versions against the pins."""
    from .doctor import report

    text, ok = report()
    out.print(text)
    if not ok:
        sys.exit(1)


@cli.command()
@recipe_arg
@overrides_arg
@click.option("--force", multiple=True, metavar="STAGE",
              help="Rebuild this stage even if cached (repeatable; 'all' for every stage).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--bench", "run_bench", is_flag=True,
              help="Then benchmark the engine with the recipe's bench section (report + plots "
              "under <engine dir>/bench/).")
def build(recipe: Path, overrides: tuple[str, ...], force: tuple[str, ...], as_json: bool,
          run_bench: bool) -> None:
    """Run every stage of RECIPE (reusing the cache) and publish engines/<name>/."""
    from .executor import default_engines_root, execute
    from .plan import make_plan
    from .stages import STAGES

    p = make_plan(load_recipe(recipe, overrides))
    unknown = [f for f in force if f != "all" and f not in STAGES]
    if unknown:
        raise bad_input("--force", f"unknown stage {unknown[0]!r}",
                        f"Use one of all, {', '.join(STAGES)}.")

    result = execute(p, Cache(), default_engines_root(), force)
    report: list[Path] = []
    if run_bench:
        from .bench.cli_commands import bench_engine

        markdown, report = bench_engine(result.engine_dir,
                                        out_dir=result.engine_dir / REPORTS_DIR)
        if not as_json:
            out.print(markdown)
    if as_json:
        out.print_json(json.dumps({
            "engine_dir": str(result.engine_dir),
            "stages": [r.model_dump() for r in result.stages],
            "bench": [str(p) for p in report],
        }))
        return
    for r in result.stages:
        status = "cached" if r.cached else f"built in {r.seconds:.1f} s"
        out.print(f"{r.stage:<10} {r.key}  {status}")
    out.print(f"engine: {result.engine_dir}")
    if report:
        out.print(f"report: {report[1]}")


@cli.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              default="float16", show_default=True)
@click.option("--family", default="auto", show_default=True, help="Model family or auto.")
def convert(hf_dir: Path, out_dir: Path, dtype: str, family: str) -> None:
    """Convert a Hugging Face model directory to a TensorRT-LLM checkpoint."""
    from .families.apply import convert_checkpoint
    from .fsio import atomic_output_dir

    with atomic_output_dir(out_dir) as tmp:
        metrics = convert_checkpoint(hf_dir, tmp, dtype, family)
    out.print(f"{out_dir}  ({metrics['family']}, {metrics['parameters']:,} parameters)")


@cli.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Prompt text (repeatable: the prompts run as one batch).")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--system", default=None, help="System message, with --chat.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print tokens as they come.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None,
              help="Default: the recipe's runner.max_new_tokens, else 64.")
@click.option("--temperature", type=click.FloatRange(0), default=None)
@click.option("--top-k", type=click.IntRange(0), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
def run(engine_dir: Path, prompts: tuple[str, ...], chat: bool, system: str | None, stream: bool,
        **sampling: object) -> None:
    """Generate text with an engine dir (or a checkpoint dir, on the CPU reference model)."""
    from .runner import Runner
    from .runner.defaults import sampling_params

    runner = Runner.open(engine_dir)
    params = sampling_params(engine_dir, sampling)
    ids = [runner.encode(p, chat=chat, system=system) for p in prompts]
    texts = [""] * len(ids)
    for event in runner.generate(ids, params):
        texts[event.request] += event.text
        if stream and len(ids) == 1:
            out.print(event.text, end="")
    if stream and len(ids) == 1:
        out.print()
    else:
        for prompt, text in zip(prompts, texts, strict=True):
            out.print(f"[bold]{prompt}[/]{text}")


@cli.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--against", "hf_dir", type=click.Path(path_type=Path), required=True,
              help="The Hugging Face model directory the artifact was built from.")
@click.option("--text", default="builtin", show_default=True,
              help="Text to evaluate on: builtin (held-out Shakespeare), random, or a file.")
@click.option("--tokens", type=click.IntRange(16), default=512, show_default=True)
@click.option("--window", type=click.IntRange(2), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(artifact_dir: Path, hf_dir: Path, text: str, tokens: int, window: int,
           as_json: bool) -> None:
    """Compare an artifact's logits with its Hugging Face source."""
    from .verify import verify as run_verify

    report = run_verify(artifact_dir, hf_dir, text, tokens, window)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    out.print(f"{report.artifact} ({report.runtime}) vs {hf_dir}: {report.tokens} tokens")
    out.print(f"  max |logit diff| {report.max_abs_diff:.3g}   mean {report.mean_abs_diff:.3g}")
    out.print(f"  top-1 agreement  {report.top1_agreement:.4f}")
    out.print(f"  perplexity       artifact {report.ppl_artifact:.3f}   hf {report.ppl_hf:.3f}")


@cli.command()
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["awq", "rtn"]), default="awq", show_default=True)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["128", "64", "-1"]), default="128",
              show_default=True, help="-1 = one scale per output channel (rtn).")
@click.option("--calib", default="builtin", show_default=True,
              help="Calibration text: builtin, random (token ids), or a UTF-8 file.")
@click.option("--samples", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True)
@click.option("--exclude", multiple=True, help="fnmatch pattern kept in float (repeatable; "
              "default lm_head).")
@click.option("--no-exclude", is_flag=True,
              help="Quantize every linear, lm_head included (a tied head is stored apart).")
@click.option("--skip-indivisible/--no-skip-indivisible", default=True, show_default=True,
              help="Keep linears whose in-width the group size does not divide in float, "
                   "instead of refusing the checkpoint.")
@click.option("--eval-text", default="builtin", show_default=True,
              help="Held-out text for the quality figures: builtin, random, or a file.")
@click.option("--gate", is_flag=True, help="Fail (exit 1, nothing written) beyond the bounds.")
@click.option("--max-ppl-ratio", type=float, default=1.25, show_default=True)
@click.option("--min-top1", type=float, default=0.75, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def quantize(ckpt_dir: Path, out_dir: Path, method: str, bits: str, group_size: str, calib: str,
             samples: int, seq_len: int, exclude: tuple[str, ...], no_exclude: bool,
             skip_indivisible: bool, eval_text: str, gate: bool, max_ppl_ratio: float,
             min_top1: float, as_json: bool) -> None:
    """Quantize a float TensorRT-LLM checkpoint (INT4 AWQ, or RTN INT4/INT8) and report its
    perplexity and top-1 agreement against the float one on held-out text."""
    from .errors import StageFailed
    from .fsio import atomic_output_dir
    from .quant.quality import evaluate
    from .quant.quantize import QuantParams, quantize_checkpoint

    if no_exclude and exclude:
        raise bad_input("--no-exclude", "given with --exclude", "Pass one of them.")
    params = QuantParams(method=method, bits=int(bits), group_size=int(group_size),
                         exclude=() if no_exclude else exclude or ("lm_head",),
                         skip_indivisible=skip_indivisible, calib_data=calib, samples=samples,
                         seq_len=seq_len)
    with atomic_output_dir(out_dir) as tmp:
        metrics = quantize_checkpoint(ckpt_dir, tmp, params)
        quality = evaluate(ckpt_dir, tmp, eval_text)
        failed = gate and (quality["ppl_ratio"] > max_ppl_ratio
                           or quality["top1_agreement"] < min_top1)
        if failed:
            raise StageFailed(f"quality gate: perplexity ratio {quality['ppl_ratio']:.4f} "
                              f"(max {max_ppl_ratio}), top-1 agreement "
                              f"{quality['top1_agreement']:.4f} (min {min_top1}); nothing written")
    if as_json:
        out.print_json(json.dumps({"out_dir": str(out_dir), "scheme": metrics["scheme"],
                                   "seconds": metrics["seconds"], **quality}))
        return
    out.print(f"{out_dir}  ({metrics['scheme']}, {metrics['quant_algo']}, "
              f"{metrics['seconds']:.1f} s)")
    out.print(f"  perplexity float {quality['ppl_float']:.3f}  quantized "
              f"{quality['ppl_quant']:.3f}  (x{quality['ppl_ratio']:.4f})  top-1 agreement "
              f"{quality['top1_agreement']:.4f}  on {quality['tokens']} held-out tokens")


@cli.command(name="ls")
def ls_cmd() -> None:
    """List cached artifacts and published engines with their sizes."""
    from .executor import default_engines_root

    cache = Cache()
    table = Table(title=f"cache: {cache.root}")
    for col in ("stage", "key", "MB", "finished"):
        table.add_column(col)
    for e in cache.entries():
        table.add_row(e.stage, e.key, f"{e.bytes / 1e6:.1f}", e.finished)
    out.print(table)
    root = default_engines_root()
    engines = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) \
        if root.is_dir() else []
    for d in engines:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.print(f"engine  {d}  {size / 1e6:.1f} MB")


@cli.command()
@click.option("--stage", default=None, help="Only this stage's artifacts.")
@click.option("--engines", is_flag=True, help="Also delete published engine dirs.")
def clean(stage: str | None, engines: bool) -> None:
    """Delete cached artifacts (all, or one stage's); those a running build holds are kept."""
    import shutil

    from .executor import default_engines_root
    from .stages import STAGES

    if stage is not None and stage not in STAGES:
        raise bad_input("--stage", f"unknown stage {stage!r}", f"Use one of {', '.join(STAGES)}.")
    freed, busy = Cache().remove(stage)
    for d, holder in busy:
        out.print(f"skipped {d}: in use by a running build ({holder})")
    out.print(f"freed {freed / 1e6:.1f} MB of cache")
    if engines and default_engines_root().is_dir():
        for d in default_engines_root().iterdir():
            if d.is_dir():
                shutil.rmtree(d)
        out.print(f"removed engines under {default_engines_root()}")


from .bench.cli_commands import bench, serve  # noqa: E402 - registered after the group exists
from .ci import check_command, matrix_command  # noqa: E402

for _command in (serve, bench, matrix_command, check_command):
    cli.add_command(_command)


def main() -> None:
    """Entry point: bad input exits 2 and a failed stage 1, both without a traceback."""
    try:
        code = cli.main(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except BadInput as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except PipelineError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
