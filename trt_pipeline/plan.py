"""Recipe + what the source says -> Plan: stages to run, the target, rules that need the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_fit
from .checkpoint.desc import NEVER_QUANTIZED, ModelDesc
from .errors import BadInput, Problem
from .families import family_for
from .families.apply import checkpoint_config
from .families.hf import read_hf_config
from .families.rules import Family
from .memory_fit import MemoryEstimate
from .recipe.load import LoadedRecipe
from .recipe.schema import QuantizeSection
from .stages.build_rtx import BuildRtxParams
from .stages.build_trtllm import BuildTrtllmParams
from .stages.convert import ConvertParams
from .stages.lower import LowerParams
from .stages.quantize import QuantizeParams
from .stages.source import SourceParams, resolve_source
from .stages.verify import VerifyParams
from .targets import TARGETS, Target


@dataclass(frozen=True)
class StageSpec:
    """One stage to run: registry name, params, and which earlier stage feeds each input."""

    stage: str
    params: Any
    inputs: dict[str, str]


@dataclass(frozen=True)
class Plan:
    loaded: LoadedRecipe
    target: Target
    family: Family
    source_dir: Path
    desc: ModelDesc
    specs: tuple[StageSpec, ...]
    engine_stage: str  # whose artifact is published as engines/<name>/
    estimate: MemoryEstimate | None = None
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.loaded.recipe.name


def make_plan(loaded: LoadedRecipe) -> Plan:
    """Resolve the source, detect the family, check every rule that needs the model, and list
    the stages. Raises BadInput with all problems found."""
    r = loaded.recipe
    where = loaded.where
    try:
        source_dir = resolve_source(r.model.source, r.model.revision)
        hf = read_hf_config(source_dir)
        family = family_for(hf, r.model.family, where("model.family"))
        cfg = checkpoint_config(family, hf, r.model.dtype)
    except BadInput as exc:
        raise BadInput([_locate(p, loaded) for p in exc.problems], _source(loaded)) from None
    desc = ModelDesc.from_config(cfg)
    target = TARGETS[r.build.target]
    problems = model_rules(loaded, family, desc)
    estimate = None
    if target.kind != "cpu":
        b = r.build
        estimate = memory_fit.estimate(engine_desc(desc, r.quantize), weight_bits(r.quantize),
                                       engine_dtype(loaded), b.max_batch_size, b.max_input_len,
                                       b.max_seq_len, target, group_size=r.quantize.group_size,
                                       backend=b.backend, max_num_tokens=b.max_num_tokens,
                                       tp_size=b.tp_size, pp_size=b.pp_size)
        problems += [_locate(p, loaded) for p in memory_fit.fit_problems(
            estimate, target, r.quantize.method, r.build.backend)]
    if problems:
        raise BadInput(problems, _source(loaded))
    specs = stage_specs(loaded, family, source_dir)
    engine_stage = next(s.stage for s in reversed(specs) if s.stage != "verify")
    return Plan(loaded, target, family, source_dir, desc, tuple(specs), engine_stage, estimate,
                tuple(_notes(loaded)))


def engine_desc(desc: ModelDesc, q: QuantizeSection) -> ModelDesc:
    """The model as the engine will hold it: a tied head that is quantized is stored apart from
    the float embedding (quant/quantize.py), so it counts as a linear of its own."""
    import dataclasses
    import fnmatch

    quantized_head = q.method != "none" and not any(
        fnmatch.fnmatchcase("lm_head", p) for p in q.exclude)
    if desc.tie_word_embeddings and quantized_head:
        return dataclasses.replace(desc, tie_word_embeddings=False)
    return desc


def weight_bits(q: QuantizeSection) -> dict[str, int]:
    """fnmatch pattern -> weight bits as the quantize stage will store them (first match wins;
    16 = float at the engine dtype)."""
    if q.method == "none":
        return {"*": 16}
    return {**{p: 16 for p in (*q.exclude, *NEVER_QUANTIZED)}, "*": q.bits}


def stage_specs(loaded: LoadedRecipe, family: Family, source_dir: Path) -> list[StageSpec]:
    """source -> convert -> [quantize] -> the backend's stages; the last one is the engine."""
    r = loaded.recipe
    b = r.build
    specs = [
        StageSpec("source", SourceParams(str(source_dir), r.model.revision), {}),
        StageSpec("convert", ConvertParams(r.model.dtype, family.name), {"source": "source"}),
    ]
    ckpt = "convert"
    if r.quantize.method != "none":
        specs.append(StageSpec("quantize", QuantizeParams.from_recipe(r.quantize, b.backend),
                               {"checkpoint": "convert"}))
        ckpt = "quantize"
    if b.backend in ("onnx", "rtx"):
        specs.append(StageSpec("lower", LowerParams(engine_dtype(loaded)), {"checkpoint": ckpt}))
        engine = "lower"
        if b.backend == "rtx":
            t = TARGETS[b.target]
            specs.append(StageSpec("build_rtx", BuildRtxParams(
                t.name, t.sm, b.max_batch_size, b.max_input_len, b.max_seq_len), {"onnx": "lower"}))
            engine = "build_rtx"
        specs.append(StageSpec("verify", VerifyParams(_verify_text(loaded, source_dir),
                                                      min_top1=_verify_bound(loaded)),
                               {"engine": engine, "source": "source"}))
    elif b.backend == "trtllm":
        params = BuildTrtllmParams.from_build(b, target_sm=TARGETS[b.target].sm,
                                              max_num_tokens=max_num_tokens(loaded))
        specs.append(StageSpec("build_trtllm", params, {"checkpoint": ckpt}))
    return specs


def model_rules(loaded: LoadedRecipe, family: Family, desc: ModelDesc) -> list[Problem]:
    """Rules across recipe and model: backend x family, group size x widths, plugins x MoE."""
    r = loaded.recipe
    b, q = r.build, r.quantize
    out: list[Problem] = []

    def add(key: str, msg: str, fix: str | None = None) -> None:
        out.append(Problem(key, msg, fix, loaded.where(key)))

    if b.backend not in family.backends:
        note = family.backend_notes.get(b.backend, "")
        add("build.backend", f"{family.name} cannot be built by the {b.backend} backend"
            + (f": {note}" if note else ""), f"Use one of {', '.join(family.backends)}.")
    if b.plugins.moe not in ("auto", "disable") and desc.moe is None:
        add("build.plugins.moe", f"got {b.plugins.moe!r} but {family.name} is a dense model "
            "(no experts)", "Set build.plugins.moe=auto.")
    if b.max_seq_len > desc.max_position_embeddings:
        add("build.max_seq_len", f"got {b.max_seq_len}; the model supports "
            f"{desc.max_position_embeddings} positions (max_position_embeddings)",
            f"Set build.max_seq_len<={desc.max_position_embeddings}.")
    if b.kv_cache.dtype in ("int8", "fp8"):
        # No stage writes kv_cache_quant_algo (quant/quantize.py), so build_trtllm would refuse
        # it only after convert and quantize ran: refused here, before anything runs.
        kv = b.kv_cache.dtype
        why = (f"onnx and rtx keep the KV cache in the activation dtype ({kv} would be for the "
               "trtllm backend only), and " if b.backend != "trtllm" else "")
        add("build.kv_cache.dtype", f"got {kv}; {why}a quantized KV cache is not implemented: "
            "no stage writes kv_cache_quant_algo (supported: auto, the activation dtype; "
            "float16 with a float16 model)", "Set build.kv_cache.dtype=auto.")
    if q.method != "none":
        out += _quantize_rules(loaded, desc)
    if q.method != "none" and q.group_size != -1:
        out += _group_rules(loaded, desc)
    if b.backend == "trtllm" and q.method == "awq" and desc.moe is not None:
        # facts/trtllm.md §10 and the 1.2.1 sources: AWQ for MoE in the engine flow is unproven
        # (#1580; Model-Optimizer PR #155), and the MoE plugin keeps one pre-quant scale for all
        # experts (modeling_utils.py preprocess_perlayer_weights), which per-expert AWQ is not.
        add("quantize.method", f"awq with the MoE family {family.name} on trtllm is not "
            "supported by TensorRT-LLM 1.2.1's engine flow",
            "Use quantize.method=rtn with quantize.group_size=-1 (W4A16 weight-only, MoE "
            "plugin), or build.backend=rtx.")
    return out


def _quantize_rules(loaded: LoadedRecipe, desc: ModelDesc) -> list[Problem]:
    """What the quantize stage would refuse only after convert ran: checked up front."""
    import fnmatch

    q = loaded.recipe.quantize
    out = []
    for key, spec in (("quantize.calib.data", q.calib.data), ("quantize.gate.text", q.gate.text)):
        if spec not in ("builtin", "random") and not Path(spec).is_file():
            out.append(Problem(key, f"{spec} does not exist or is not a file",
                               f"Give a UTF-8 text file, builtin, or random ({key}=random).",
                               loaded.where(key)))
    if q.method == "awq" and q.calib.seq_len > desc.max_position_embeddings:
        out.append(Problem("quantize.calib.seq_len", f"got {q.calib.seq_len}; the model has "
                           f"{desc.max_position_embeddings} positions (max_position_embeddings)",
                           f"Set quantize.calib.seq_len<={desc.max_position_embeddings}.",
                           loaded.where("quantize.calib.seq_len")))
    if not [lin for lin in desc.quantizable()
            if not any(fnmatch.fnmatchcase(lin.name, p) for p in q.exclude)]:
        out.append(Problem("quantize.exclude", f"{list(q.exclude)} excludes every quantizable "
                           "linear", "Remove patterns, or set quantize.method=none.",
                           loaded.where("quantize.exclude")))
    return out


def _group_rules(loaded: LoadedRecipe, desc: ModelDesc) -> list[Problem]:
    import fnmatch

    q = loaded.recipe.quantize
    g = q.group_size
    candidates = [lin for lin in desc.quantizable()
                  if not any(fnmatch.fnmatchcase(lin.name, p) for p in q.exclude)]
    bad = [lin for lin in candidates if lin.in_features % g]
    where = loaded.where("quantize.group_size")
    if candidates and len(bad) == len(candidates):
        widths = sorted({lin.in_features for lin in candidates})
        return [Problem("quantize.group_size", f"got {g}; it divides no layer's input width "
                        f"({', '.join(map(str, widths))})", "Use a group size that divides "
                        "the hidden and intermediate sizes, or -1 (per channel, rtn).", where)]
    if bad and not q.skip_indivisible:
        names = ", ".join(f"{lin.name} (in {lin.in_features})" for lin in bad[:3])
        return [Problem("quantize.group_size", f"got {g}; it does not divide the input width of "
                        f"{len(bad)} linears, e.g. {names}",
                        "Set quantize.skip_indivisible=true to keep them in float.", where)]
    return []


def _verify_text(loaded: LoadedRecipe, source_dir: Path) -> str:
    """The held-out text of quantize.gate.text; random ids when the source has no tokenizer
    (random-weight models of real shapes), said in the plan's notes."""
    text = loaded.recipe.quantize.gate.text
    return "random" if text == "builtin" and not (source_dir / "tokenizer.json").is_file() \
        else text


def _verify_bound(loaded: LoadedRecipe) -> float:
    """Top-1 agreement with transformers a published engine must reach: the quantize gate's
    bound for quantized models; near-exact for float ones (fp16 rounding flips a few ties)."""
    r = loaded.recipe
    if r.quantize.method != "none":
        return r.quantize.gate.min_top1
    return 0.99 if engine_dtype(loaded) == "float32" else 0.95


def _notes(loaded: LoadedRecipe) -> list[str]:
    """Defaults that change a build, said out loud in `plan`."""
    b = loaded.recipe.build
    notes = []
    if b.dtype == "auto":
        notes.append(f"build.dtype auto -> {engine_dtype(loaded)}")
    source = Path(loaded.recipe.model.source)
    if b.backend != "trtllm" and source.is_dir() and not (source / "tokenizer.json").is_file():
        notes.append("the source has no tokenizer: verify (and text calibration) use random ids")
    if b.backend == "trtllm" and b.max_num_tokens is None:
        notes.append(f"build.max_num_tokens default -> {max_num_tokens(loaded)}")
    return notes


def engine_dtype(loaded: LoadedRecipe) -> str:
    b = loaded.recipe.build
    if b.dtype != "auto":
        return b.dtype
    return "float32" if b.backend == "onnx" else "float16"


def max_num_tokens(loaded: LoadedRecipe) -> int:
    b = loaded.recipe.build
    return b.max_num_tokens or memory_fit.default_max_num_tokens(b.max_batch_size,
                                                                  b.max_input_len)


def _locate(p: Problem, loaded: LoadedRecipe) -> Problem:
    if p.where or not p.path:
        return p
    return Problem(p.path, p.message, p.fix, loaded.where(p.path))


def _source(loaded: LoadedRecipe) -> str:
    return str(loaded.path) if loaded.path else loaded.recipe.name
