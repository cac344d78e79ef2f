"""Read a recipe (with `extends:`), apply overrides, validate; each failure is a located Problem."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import BadInput, Problem, did_you_mean
from ..targets import TARGETS
from .overrides import apply_overrides, parse_overrides
from .schema import SECTIONS, Recipe

# Keys whose values are file paths: relative ones resolve against the file that sets them.
PATH_KEYS = ("model.source", "quantize.calib.data", "quantize.gate.text", "bench.workload")
KEYWORDS = {"builtin", "random", "synthetic"}
MAX_RECIPE_BYTES = 1_000_000
MAX_EXTENDS_DEPTH = 16
MAX_NODES = 100_000  # YAML aliases can expand a small file exponentially ("billion laughs")


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where each key came from (file:line or the override that set it)."""

    recipe: Recipe
    path: Path | None
    origins: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str | None:
        return _where(self.origins, key, self.path)

    def to_yaml(self) -> str:
        """The resolved recipe, as saved next to each engine."""
        return yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Load, merge `extends`, override and validate; raises BadInput listing every problem."""
    path = Path(path)
    data, origins = _read_with_extends(path, chain=())
    parsed, problems = parse_overrides(list(overrides))
    problems += apply_overrides(data, parsed, origins)
    for ov in parsed:
        if ov.key in PATH_KEYS and isinstance(ov.value, str):
            _set(data, ov.key, _resolve_path(ov.value, Path.cwd()))
    return validate_recipe(data, origins, path, problems)


def validate_recipe(
    data: dict[str, Any], origins: dict[str, str], path: Path | None, problems: list[Problem]
) -> LoadedRecipe:
    problems = list(problems)
    data.pop("extends", None)
    recipe: Recipe | None = None
    invalid: set[str] = set()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems += [_problem_from_pydantic(err, origins, path) for err in errors]
        invalid = {_field_of(err["loc"]) for err in errors}
    checkable = recipe or _without_invalid(data, invalid)
    if checkable is not None:  # cross-field rules whose own fields are valid, errors or not
        problems += recipe_rules(LoadedRecipe(checkable, path, origins), frozenset(invalid))
    if problems:
        raise BadInput(problems, str(path) if path else "recipe")
    assert recipe is not None
    return LoadedRecipe(recipe, path, origins)


def recipe_rules(loaded: LoadedRecipe, invalid: frozenset[str] = frozenset()) -> list[Problem]:
    """Rules across fields that need only the recipe (the plan adds those that need the model).
    A rule runs only when none of its fields is in `invalid` (keys that failed validation), so
    field and cross-field errors are reported together."""
    r = loaded.recipe
    b, q = r.build, r.quantize
    target = TARGETS[b.target]
    out: list[Problem] = []

    def add(key: str, msg: str, fix: str | None = None) -> None:
        out.append(Problem(key, msg, fix, loaded.where(key)))

    def ok(*keys: str) -> bool:
        return not any(k == bad or k.startswith(f"{bad}.") or bad.startswith(f"{k}.")
                       for k in keys for bad in invalid)

    if ok("build.max_input_len", "build.max_seq_len") and b.max_input_len > b.max_seq_len:
        add("build.max_input_len", f"got {b.max_input_len}, larger than build.max_seq_len "
            f"({b.max_seq_len})", f"Set build.max_input_len<={b.max_seq_len} or raise max_seq_len.")
    if ok("quantize.method", "quantize.bits") and q.method == "awq" and q.bits != 4:
        add("quantize.bits", f"got {q.bits}; awq produces 4-bit weights (W4A16_AWQ)",
            "Set quantize.bits=4, or quantize.method=rtn for INT8 weight-only.")
    if ok("quantize.method", "quantize.bits", "quantize.group_size") and q.method == "rtn" \
            and q.bits == 8 and q.group_size != -1:
        add("quantize.group_size", f"got {q.group_size}; INT8 weight-only (W8A16) is per-channel "
            "in TensorRT-LLM", "Set quantize.group_size=-1.")
    if ok("quantize.method", "quantize.group_size") and q.method == "awq" \
            and q.group_size == -1:
        add("quantize.group_size", "got -1; AWQ is group-wise (W4A16_AWQ)",
            "Set quantize.group_size=128.")
    gpu = ok("build.backend", "build.target")
    if gpu and b.backend == "onnx" and target.kind != "cpu":
        add("build.target", f"got {b.target!r}; the onnx backend runs on the CPU (ONNX Runtime)",
            "Set build.target=cpu, or build.backend=rtx for an RTX GPU engine.")
    if gpu and b.backend != "onnx" and target.kind == "cpu":
        add("build.target", f"got 'cpu'; the {b.backend} backend builds for an NVIDIA GPU",
            "Set build.target to a GPU such as rtx3060-12gb, or build.backend=onnx.")
    if gpu and b.backend == "rtx" and target.kind == "datacenter":
        add("build.target", f"got {b.target!r} (SM{target.sm}); TensorRT for RTX builds for "
            "GeForce/RTX GPUs (SM86, SM89, SM120), not data-centre GPUs",
            "Use build.backend=trtllm for data-centre GPUs.")
    if ok("build.kv_cache.dtype", "build.target") and b.kv_cache.dtype == "fp8" \
            and "fp8" not in target.precisions:
        add("build.kv_cache.dtype", f"fp8 needs SM89 or newer; {b.target} is SM{target.sm}",
            "Set build.kv_cache.dtype=auto.")
    if ok("build.backend", "build.tp_size", "build.pp_size") and b.backend != "trtllm" \
            and (b.tp_size > 1 or b.pp_size > 1):
        add("build.tp_size", "tensor/pipeline parallelism needs the trtllm backend, "
            f"not {b.backend}",
            "Set build.tp_size=1 and build.pp_size=1.")
    if ok("build.backend", "build.kv_cache.dtype", "model.dtype") and b.backend == "trtllm" \
            and b.kv_cache.dtype == "float16" and r.model.dtype == "bfloat16":
        add("build.kv_cache.dtype", "float16 KV cache with a bfloat16 model",
            "Set build.kv_cache.dtype=auto.")
    if ok("bench.workload"):
        out += _workload_problems(r.bench.workload, loaded.where("bench.workload"))
    return out


def _workload_problems(spec: str, where: str | None) -> list[Problem]:
    """`build --bench` reads the workload only after the whole build: check it up front."""
    key, fix = "bench.workload", "Give a trtllm-bench .jsonl or a .txt file, or synthetic."
    if spec == "synthetic":
        return []
    if not spec.endswith((".jsonl", ".txt")):
        return [Problem(key, f"got {spec!r}; expected synthetic, a .jsonl or a .txt file", fix,
                        where)]
    if not Path(spec).is_file():
        return [Problem(key, f"{spec} does not exist or is not a file", fix, where)]
    if not os.access(spec, os.R_OK):
        return [Problem(key, f"{spec} is not readable", "Fix its permissions.", where)]
    return []


# --- reading -----------------------------------------------------------------------------------


def _read_with_extends(path: Path, chain: tuple[Path, ...]
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve() if path.exists() else path
    data, origins = read_yaml(path)
    parent = data.pop("extends", None)
    where = origins.pop("extends", str(path))
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise BadInput([Problem("extends", f"got {parent!r}; expected a recipe file path", None,
                                where)], str(path))
    parent_path = Path(parent) if os.path.isabs(parent) else path.parent / parent
    if not parent_path.is_file():
        raise BadInput([Problem("extends", f"{parent!r} not found (looked at {parent_path})", None,
                                where)], str(path))
    top = str(chain[0] if chain else path)  # checked here, where `extends:` has a line
    if parent_path.resolve() in (*chain, resolved):
        cycle = " -> ".join(str(p) for p in (*chain, resolved, parent_path.resolve()))
        raise BadInput([Problem("extends", f"cycle: {cycle}", "Remove one of the extends.",
                                where)], top)
    if len(chain) + 1 >= MAX_EXTENDS_DEPTH:
        raise BadInput([Problem("extends", f"more than {MAX_EXTENDS_DEPTH} levels of extends",
                                None, where)], top)
    try:
        base, base_origins = _read_with_extends(parent_path, (*chain, resolved))
    except BadInput as exc:
        if any(p.path == "extends" for p in exc.problems):
            raise
        inner = "; ".join(p.render() for p in exc.problems)
        raise BadInput([Problem("extends", f"{parent!r} is not a usable recipe: {inner}",
                                None, where)], str(path)) from None
    return _merge(base, data), {**base_origins, **origins}


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse one YAML file into a dict and a map of dotted key -> 'file:line'."""
    where = str(path)
    if not path.exists():
        raise BadInput([Problem("", "recipe file not found", None, where)], where)
    if not path.is_file():
        raise BadInput([Problem("", "not a regular file", None, where)], where)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput([Problem("", f"cannot read: {exc.strerror}", None, where)], where) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise BadInput([Problem("", f"{len(raw)} bytes; a recipe is at most {MAX_RECIPE_BYTES}",
                                None, where)], where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInput([Problem("", f"not UTF-8 (byte {exc.start}: {raw[exc.start]:#x})",
                                "Save the file as UTF-8.", f"{where}:{line}")], where) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        size = _expanded_size(node, {})
        if size > MAX_NODES:
            raise BadInput([Problem("", f"expands to {size:,} YAML nodes (aliases); a recipe "
                                    f"has at most {MAX_NODES:,}", "Remove the aliases.", where)],
                           where)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f"{where}:{mark.line + 1}" if mark else where
        what = getattr(exc, "problem", None) or str(exc)
        raise BadInput([Problem("", f"YAML syntax error: {what}", None, loc)], where) from None
    except RecursionError:
        raise BadInput([Problem("", "YAML nested too deeply", None, where)], where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput([Problem("", f"top level is a {type(data).__name__}; expected a mapping "
                                "of sections (name, model, build, ...)", None, where)], where)
    origins: dict[str, str] = {}
    problems: list[Problem] = []
    _walk(node, "", where, origins, problems, set())
    if problems:
        raise BadInput(problems, where)
    for key in PATH_KEYS:
        value = _get(data, key)
        if isinstance(value, str):
            _set(data, key, _resolve_path(value, path.parent))
    return data, origins


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes the document has once aliases are expanded, counted over shared nodes once each."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a cycle counts once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _walk(node: Any, prefix: str, where: str, origins: dict[str, str], problems: list[Problem],
          seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias: its keys were located where the anchor is
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            loc = f"{where}:{key_node.start_mark.line + 1}"
            if key in seen:
                problems.append(Problem(path, "duplicate key", "Keep one of them.", loc))
            seen.add(key)
            origins[path] = loc
            _walk(value_node, path, where, origins, problems, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            origins[f"{prefix}.{i}"] = f"{where}:{item.start_mark.line + 1}"
            _walk(item, f"{prefix}.{i}", where, origins, problems, seen_nodes)


def _resolve_path(value: str, base: Path) -> str:
    if value in KEYWORDS or os.path.isabs(value):
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value


# --- pydantic errors -> problems ----------------------------------------------------------------

_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "tuple_type": "a list", "model_type": "a mapping",
               "dict_type": "a mapping", "list_type": "a list", "int_from_float": "an integer"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def _problem_from_pydantic(err: Any, origins: dict[str, str], path: Path | None) -> Problem:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    where = _where(origins, key, path)
    kind, got = err["type"], err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        section = ".".join(p for p in loc[:-1] if not p.isdigit())
        fields = list(SECTIONS[section].model_fields) if section in SECTIONS else []
        prefix = f"{section}." if section else ""
        fix = did_you_mean(loc[-1], fields).replace("mean ", f"mean {prefix}") or (
            f"Valid keys here: {', '.join(fields)}." if fields else None)
        return Problem(key, "unknown key", fix, where)
    if kind == "missing":
        return Problem(key, "required key is missing", None, where)
    if kind == "literal_error":
        return Problem(key, f"got {got!r}; expected one of {ctx.get('expected', '')}", None, where)
    if kind in _BOUNDS:
        bound = next(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt"))
        return Problem(key, f"got {got!r}; expected {_BOUNDS[kind]} {bound}", None, where)
    if kind in _TYPE_NAMES:
        return Problem(key, f"got {got!r} ({type(got).__name__}); expected {_TYPE_NAMES[kind]}",
                       None, where)
    if kind == "string_pattern_mismatch":
        return Problem(key, f"got {got!r}; expected letters, digits, '.', '_' or '-' (no '/'), "
                       "starting with a letter or digit", None, where)
    if kind in ("too_short", "too_long"):
        return Problem(key, f"got {got!r}; {err['msg'].lower()}", None, where)
    msg = err["msg"].removeprefix("Value error, ")
    return Problem(key, msg, None, where)


def _field_of(loc: tuple[int | str, ...]) -> str:
    """The recipe field a pydantic error is about: `quantize.exclude.1` -> `quantize.exclude`."""
    parts = [str(p) for p in loc]
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[:cut])


def _without_invalid(data: dict[str, Any], invalid: set[str]) -> Recipe | None:
    """The recipe with every invalid key dropped (defaults take their place, placeholders for
    required ones), so the rules whose own fields are valid can still run; None if that fails."""
    clean = copy.deepcopy(data)
    for key in invalid:
        *parents, leaf = key.split(".") if key else [""]
        node = _get(clean, ".".join(parents)) if parents else clean
        if isinstance(node, dict):
            node.pop(leaf, None)
    _fill_required(Recipe, clean)
    try:
        return Recipe.model_validate(clean)
    except ValidationError:
        return None


def _fill_required(model: type[BaseModel], data: dict[str, Any]) -> None:
    for name, info in model.model_fields.items():
        ann = info.annotation
        section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if name not in data and info.is_required():
            args = get_args(ann) if get_origin(ann) is Literal else ()
            data[name] = {} if section else args[0] if args else "placeholder"
        if section and isinstance(data.get(name), dict):
            _fill_required(ann, data[name])


def _where(origins: dict[str, str], key: str, path: Path | None) -> str | None:
    k = key
    while k:
        if k in origins:
            return origins[k]
        k = k.rpartition(".")[0]
    return str(path) if path else None
