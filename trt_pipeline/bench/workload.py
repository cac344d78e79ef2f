"""Benchmark requests: trtllm-bench JSONL in and out, windows of a text, or synthetic token ids.

The JSONL format is trtllm-bench's (trtllm.md §13), so a workload made here runs unchanged under
`trtllm-bench throughput --dataset` and one made by `trtllm-bench prepare-dataset` runs here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..errors import BadInput, Problem, did_you_mean
from ..fsio import write_text_atomic

MAX_PROBLEMS = 50  # a wholly wrong file would otherwise print one line per request


@dataclass(frozen=True, slots=True)
class Request:
    """One benchmark request; exactly one of prompt or input_ids is set.

    `load_jsonl` applies trtllm-bench's "input_ids wins if both" rule once, at the boundary, so
    nothing downstream has to know it.
    """

    task_id: int
    prompt: str | None
    input_ids: tuple[int, ...] | None
    output_tokens: int

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError(f"task {self.task_id}: set exactly one of prompt or input_ids")
        if self.output_tokens < 1:
            raise ValueError(f"task {self.task_id}: output_tokens must be >= 1")


class WorkloadLine(BaseModel):
    """One JSONL line as trtllm-bench reads it (`bench/dataclasses/general.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: StrictInt
    prompt: StrictStr | None = Field(None, min_length=1)
    input_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(None, min_length=1)
    output_tokens: StrictInt = Field(ge=1)
    # Part of the format, but our runner loads no adapters and no images: refused by name below.
    lora_request: dict[str, Any] | None = None
    media_paths: list[str] | None = None


_UNSUPPORTED = {
    "lora_request": "not supported: the pipeline's runner loads no LoRA adapters",
    "media_paths": "not supported: the pipeline benchmarks text-only engines",
}


def load_jsonl(path: str | Path) -> list[Request]:
    """Read trtllm-bench JSONL; raises BadInput naming file:line and field of every fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput([Problem("", f"cannot read workload: {exc}", None, str(path))]) from exc
    requests: list[Request] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        request, found = _parse_line(raw, f"{path}:{number}")
        problems += found
        if request is not None:
            requests.append(request)
    if not requests and not problems:
        problems.append(Problem("", "no requests (the file is empty)",
                                "Write one JSON object per line.", str(path)))
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(Problem("", f"{len(problems) - MAX_PROBLEMS} more problems not shown"))
        raise BadInput(shown, str(path))
    return requests


def _parse_line(raw: str, where: str) -> tuple[Request | None, list[Problem]]:
    fix = 'Expected {"task_id": int, "prompt": str | "input_ids": [int], "output_tokens": int}.'
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [Problem("", f"not valid JSON ({exc.msg}, column {exc.colno})", fix, where)]
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return None, [Problem("", f"got a JSON {kind}; expected an object", fix, where)]
    # Checked on the raw object too, so a line with type errors still reports these.
    problems = [Problem(k, msg, "Remove the key.", where)
                for k, msg in _UNSUPPORTED.items() if obj.get(k) is not None]
    if obj.get("prompt") is None and obj.get("input_ids") is None:
        problems.append(Problem("prompt", "required (or input_ids)", fix, where))
    try:
        line = WorkloadLine.model_validate(obj)
    except ValidationError as exc:
        return None, [_problem(err, where) for err in exc.errors()] + problems
    if problems:
        return None, problems
    ids = tuple(line.input_ids) if line.input_ids is not None else None
    prompt = None if ids is not None else line.prompt  # input_ids wins (trtllm.md §13)
    return Request(line.task_id, prompt, ids, line.output_tokens), []


def _problem(err: Any, where: str) -> Problem:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return Problem(key, "required", None, where)
    if err["type"] == "extra_forbidden":
        fields = list(WorkloadLine.model_fields)
        fix = did_you_mean(key, fields) or f"Valid keys: {', '.join(fields)}."
        return Problem(key, "unknown key", fix, where)
    got = err.get("input")
    return Problem(key, f"got {got!r}; {err['msg'][0].lower()}{err['msg'][1:]}", None, where)


def write_jsonl(requests: Sequence[Request], path: str | Path) -> None:
    """Write trtllm-bench JSONL (compact, one object per line), atomically."""
    lines = []
    for r in requests:
        d: dict[str, Any] = {"task_id": r.task_id}
        if r.input_ids is not None:
            d["input_ids"] = list(r.input_ids)
        else:
            d["prompt"] = r.prompt
        d["output_tokens"] = r.output_tokens
        lines.append(json.dumps(d, separators=(",", ":"), ensure_ascii=False))
    write_text_atomic(Path(path), "".join(line + "\n" for line in lines))


def synthetic(
    count: int, isl: int, osl: int, isl_stddev: float, osl_stddev: float, vocab_size: int, seed: int
) -> list[Request]:
    """Random token ids with normal lengths, as `trtllm-bench prepare-dataset token-norm-dist`.

    Lengths are max(1, ceil(normal(mean, stddev))) like trtllm-bench's get_norm_dist_lengths, so a
    zero stddev gives exactly isl/osl. Token ids are drawn uniformly from [0, vocab_size), distinct
    within a request while it is shorter than the vocabulary (trtllm-bench uses random.sample).
    One numpy Generator seeded once makes the list reproducible; unlike trtllm-bench, input and
    output lengths come from independent draws rather than the same reseeded stream.
    """
    _check_positive(count=count, isl=isl, osl=osl, vocab_size=vocab_size)
    if isl_stddev < 0 or osl_stddev < 0:
        raise BadInput([Problem("isl_stddev/osl_stddev", "must be >= 0")])
    rng = np.random.default_rng(seed)
    isls = _norm_lengths(rng, isl, isl_stddev, count)
    osls = _norm_lengths(rng, osl, osl_stddev, count)
    out = []
    for task_id, (n_in, n_out) in enumerate(zip(isls, osls, strict=True)):
        ids = rng.choice(vocab_size, size=n_in, replace=n_in > vocab_size)
        out.append(Request(task_id, None, tuple(int(i) for i in ids), n_out))
    return out


def from_text(
    path: str | Path,
    isl: int,
    osl: int,
    count: int,
    tokenizer_encode: Callable[[str], Sequence[int]],
    seed: int,
) -> list[Request]:
    """`count` windows of exactly `isl` tokens at seeded random offsets in a tokenised text file.

    Real text gives realistic attention and sampling paths without a dataset download; the windows
    are token ids, so the engine sees exactly `isl` tokens (no re-tokenisation drift).
    """
    _check_positive(count=count, isl=isl, osl=osl)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput([Problem("", f"cannot read text: {exc}", None, str(path))]) from exc
    tokens = list(tokenizer_encode(text))
    if len(tokens) < isl:
        raise BadInput([Problem("isl", f"the text has {len(tokens)} tokens; need at least {isl}",
                                "Use a longer text or a smaller isl.", str(path))])
    starts = np.random.default_rng(seed).integers(0, len(tokens) - isl + 1, size=count)
    return [Request(i, None, tuple(int(t) for t in tokens[s:s + isl]), osl)
            for i, s in enumerate(starts.tolist())]


def _norm_lengths(rng: np.random.Generator, mean: int, stddev: float, count: int) -> list[int]:
    return [max(1, math.ceil(x)) for x in rng.normal(mean, stddev, size=count).tolist()]


def _check_positive(**values: int) -> None:
    bad = [Problem(k, f"got {v!r}; expected an integer >= 1") for k, v in values.items()
           if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise BadInput(bad)
