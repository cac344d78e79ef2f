"""Run a lowered graph (lower.py) on ONNX Runtime's CPU provider, the KV cache kept between steps.

The API mirrors reference/model.py (forward, a cache object, greedy) so tests compare the two
directly. Positions and the mask are built here exactly as the reference builds them: positions =
cumsum(valid) - 1 over the whole sequence, mask = causal & valid, so left padding works the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..rebatch import ArrayOps, Rows, join_rows, keep_rows
from .lower import LOGITS_TO_KEEP, MODEL_FILE

# MatMulNBits accuracy levels (ONNX Runtime fuses every INT4 DQ + MatMul into one):
EXACT = 1  # float32 activations: the reference's logits to 1e-5; what the tests run
FAST = 4  # int8 activations per block: what engines should run (their runtime dict says so)
NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class OnnxKVCache:
    """present.{i}.key/value OrtValues [B, n_kv, T, D] from the last step, fed back unchanged;
    `valid` [B, T] marks real (unpadded) tokens.

    OrtValues skip the numpy copy of every present output. Measured on a 2-core machine (0.54 B
    INT4 model, context 1030) it is no faster than numpy feeds (163 vs 162 ms/token): the graph's
    own Concat(past, new), which copies the whole cache each step, dominates long contexts."""

    keys: list[ort.OrtValue] = field(default_factory=list)
    values: list[ort.OrtValue] = field(default_factory=list)
    valid: np.ndarray | None = None

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


def step_inputs(input_ids: np.ndarray, past_valid: np.ndarray | None,
                valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position_ids [B, S], attention_mask [B, 1, S, T], all_valid [B, T]) for one step."""
    b, s = input_ids.shape
    new_valid = np.ones((b, s), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    all_valid = new_valid if past_valid is None else np.concatenate([past_valid, new_valid], 1)
    t = all_valid.shape[1]
    positions = np.maximum(np.cumsum(all_valid, axis=1, dtype=np.int64) - 1, 0)[:, -s:]
    causal = np.tri(s, t, t - s, dtype=bool)
    mask = causal[None, None] & all_valid[:, None, None, :]
    # A padded query would see no key at all. ONNX defines such a row as zeros and ONNX Runtime
    # follows it, but a kernel that returns NaN there would poison the next layer's V (0 * NaN);
    # so each padded query sees itself. Real tokens never attend padding.
    mask[:, 0, np.arange(s), t - s + np.arange(s)] = True
    return positions, mask, all_valid


class OnnxModel:
    """One InferenceSession over model.onnx; layers, KV shape and dtype come from its inputs.
    Also the runner's StepModel (runner/step.py): `new_cache` and `step`."""

    runtime = "onnxruntime"
    max_batch_size = 1 << 16  # no engine profile on the CPU: memory is the only limit

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        _, self.num_kv_heads, _, self.head_size = past[0].shape
        self.kv_dtype = NP_DTYPES[past[0].type]
        self.output_names = [o.name for o in session.get_outputs()]
        self.vocab_size = session.get_outputs()[self.output_names.index("logits")].shape[-1]
        props = session.get_modelmeta().custom_metadata_map
        self.max_seq_len = int(props["max_position_embeddings"])  # the RoPE table's length

    @classmethod
    def load(cls, model_dir: Path | str, threads: int | None = None,
             accuracy_level: int = EXACT) -> OnnxModel:
        """`accuracy_level` of the MatMulNBits kernels: EXACT (1) or FAST (4, ONNX Runtime's own
        default). On 2 AVX2 cores FAST decodes the Hunyuan-0.5B shape (INT4 head) about 3x
        faster (41-50 vs 15-16 tokens/s; level 1's float32 kernel is compute-bound); it moved
        logits by up to 0.08 (span +-3) with the same greedy tokens, and on the default model
        perplexity 31.85 -> 31.88, top-1 98.6 % of level 1's (bench/bench_onnx.py --accuracy).
        `threads`: intra-op threads, default every core (on a busy 2-core host one thread can
        be faster: a parallel kernel waits for its descheduled half)."""
        opts = ort.SessionOptions()
        # errors only: ONNX Runtime warns on every load that `logits_to_keep`, an initializer
        # that is also a graph input, is not folded as a constant, which is its purpose (lower.py)
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                      str(accuracy_level))
        session = ort.InferenceSession(str(Path(model_dir) / MODEL_FILE), opts,
                                       providers=["CPUExecutionProvider"])
        return cls(session)

    def forward(self, input_ids: Any, cache: OnnxKVCache | None = None,
                valid: Any = None, last_only: bool = False) -> np.ndarray:
        """Logits [B, S, V] float32 for input_ids [B, S] (torch or numpy) appended to `cache`
        (updated in place); `valid` [B, S] is False for left padding. `last_only`: [B, 1, V],
        the vocabulary projection computed for the last position alone."""
        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
        cache = cache if cache is not None else OnnxKVCache()
        positions, mask, all_valid = step_inputs(ids, cache.valid, valid)
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask,
                 LOGITS_TO_KEEP: np.array([1 if last_only else 0], dtype=np.int64)}
        vals = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        if cache.keys:
            pasts = [*cache.keys, *cache.values]
        else:
            empty = ort.OrtValue.ortvalue_from_numpy(np.zeros(
                (ids.shape[0], self.num_kv_heads, 0, self.head_size), dtype=self.kv_dtype))
            pasts = [empty] * (2 * self.num_layers)
        for i in range(self.num_layers):
            vals[f"past_key_values.{i}.key"] = pasts[i]
            vals[f"past_key_values.{i}.value"] = pasts[self.num_layers + i]
        out = self.session.run_with_ort_values(self.output_names, vals)
        named = dict(zip(self.output_names, out, strict=True))
        cache.keys = [named[f"present.{i}.key"] for i in range(self.num_layers)]
        cache.values = [named[f"present.{i}.value"] for i in range(self.num_layers)]
        cache.valid = all_valid
        return named["logits"].numpy()

    def new_cache(self, batch: int) -> OnnxKVCache:
        return OnnxKVCache()

    def step(self, input_ids: np.ndarray, cache: OnnxKVCache, valid: np.ndarray,
             last_only: bool = False) -> np.ndarray:
        return self.forward(input_ids, cache, valid, last_only)

    def keep(self, cache: OnnxKVCache, rows: list[int]) -> OnnxKVCache:
        """In-flight batching (backends/rebatch.py): the cache of `rows` only."""
        return _cache(keep_rows(_rows(cache), rows))

    def join(self, caches: list[OnnxKVCache]) -> OnnxKVCache:
        """In-flight batching: one cache with the rows of every cache in order."""
        return _cache(join_rows([_rows(c) for c in caches], NUMPY_OPS))


NUMPY_OPS = ArrayOps(cat=lambda xs, axis: np.concatenate(list(xs), axis),
                     zeros=lambda shape, like: np.zeros(shape, like.dtype))


def _rows(c: OnnxKVCache) -> Rows[np.ndarray]:
    """The cache's OrtValues fetched as numpy arrays (a copy per join or drop, not per step)."""
    assert c.valid is not None, "an empty cache has no rows"
    return Rows([k.numpy() for k in c.keys], [v.numpy() for v in c.values], c.valid)


def _cache(r: Rows[np.ndarray]) -> OnnxKVCache:
    def ort_value(a: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))

    return OnnxKVCache([ort_value(k) for k in r.keys], [ort_value(v) for v in r.values],
                       np.ascontiguousarray(r.valid))


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> OnnxModel:
    """backends.RUNTIMES entry: model.onnx in engine_dir (or its `model_dir`); `threads` and
    `accuracy_level` from the manifest's runtime dict when it records them."""
    return OnnxModel.load(Path(engine_dir) / runtime.get("model_dir", "."),
                          threads=runtime.get("threads"),
                          accuracy_level=runtime.get("accuracy_level", EXACT))


def greedy(model: OnnxModel, input_ids: Any, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding with the KV cache; returns only the new tokens [B, N] (int64)."""
    cache = OnnxKVCache()
    logits = model.forward(input_ids, cache, last_only=True)
    out = []
    nxt = logits[:, -1].argmax(-1)[:, None]
    for _ in range(max_new_tokens):
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        nxt = model.forward(nxt, cache, last_only=True)[:, -1].argmax(-1)[:, None]
    return np.concatenate(out, axis=1).astype(np.int64)
