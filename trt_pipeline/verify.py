"""Compare an artifact with its Hugging Face source on text: the numbers users trust a build by.

The artifact runs through the same runtime the runner would use (reference model for a
checkpoint, ONNX Runtime for an ONNX or RTX engine dir on a CPU); the source runs in transformers
in float32. Both see the same token windows, each window a fresh sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput, Problem
from .runner.step import StepModel


@dataclass(frozen=True)
class VerifyReport:
    artifact: str
    runtime: str
    tokens: int
    windows: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    ppl_artifact: float
    ppl_hf: float

    def as_dict(self) -> dict:
        return asdict(self)


def verify(artifact_dir: Path, hf_dir: Path, text: str = "builtin", tokens: int = 512,
           window: int = 128) -> VerifyReport:
    """Logits of an engine or checkpoint dir vs transformers on `tokens` tokens of `text`
    (builtin held-out text, a file path, or random ids)."""
    from .runner import Runner

    runner = Runner.open(artifact_dir)
    return verify_model(runner.model, str(runner.info.get("runtime")), str(artifact_dir),
                        hf_dir, text, tokens, window)


def verify_model(model: StepModel, runtime: str, label: str, hf_dir: Path, text: str = "builtin",
                 tokens: int = 512, window: int = 128, key: str = "--text") -> VerifyReport:
    """The comparison itself, for any StepModel (the verify stage opens one from an artifact)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .textdata import eval_windows

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                              trust_remote_code=False).eval()
    if hf.config.vocab_size != model.vocab_size:
        raise BadInput([Problem("--against", f"{hf_dir} has vocab {hf.config.vocab_size}, the "
                                f"artifact {model.vocab_size}: not its source", None)])
    ids = eval_windows(text, hf_dir, model.vocab_size, tokens, window, key=key)
    diffs, agree, nll_a, nll_h, count = [], 0, 0.0, 0.0, 0
    for row in ids:
        x = row[None].numpy()
        got = model.step(x, model.new_cache(1), np.ones_like(x, dtype=bool))[0]
        with torch.no_grad():
            ref = hf(row[None]).logits[0].float().numpy()
        diffs.append(np.abs(got - ref))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        nll_a += _nll(got, row.numpy())
        nll_h += _nll(ref, row.numpy())
        count += len(row)
    all_diffs = np.concatenate([d.ravel() for d in diffs])
    targets = count - len(ids)
    return VerifyReport(
        artifact=label, runtime=runtime, tokens=count, windows=len(ids),
        max_abs_diff=float(all_diffs.max()), mean_abs_diff=float(all_diffs.mean()),
        top1_agreement=agree / count, ppl_artifact=math.exp(nll_a / targets),
        ppl_hf=math.exp(nll_h / targets))


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token negative log-likelihood of ids[1:] under logits[:-1]."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())
