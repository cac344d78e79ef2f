"""In-flight batching: KV-cache rows joined and dropped (against hand-made arrays), every row of a
batch that requests join and leave gives the reference model's own solo greedy tokens, and the
scheduler lets a late short request finish before an early long one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trt_pipeline.backends.onnx.lower import lower_checkpoint
from trt_pipeline.backends.onnx.runtime import NUMPY_OPS, OnnxModel
from trt_pipeline.backends.rebatch import Rows, join_rows, keep_rows
from trt_pipeline.backends.reference import ReferenceStep
from trt_pipeline.backends.rtx.engine import RtxModel
from trt_pipeline.errors import BadInput
from trt_pipeline.reference.model import ReferenceModel, greedy
from trt_pipeline.runner import Runner, SamplingParams
from trt_pipeline.runner.inflight import InflightBatch, can_rebatch
from trt_pipeline.scheduler import BatchScheduler


def test_join_pads_on_the_left_and_keep_trims_unused_columns():
    # layer 0 only; keys [B, 1 head, T, 1 dim] hold row*10 + column so every move is visible
    a = Rows([np.array([[[[1.0], [2.0], [3.0]]]])], [np.array([[[[-1.0], [-2.0], [-3.0]]]])],
             np.array([[True, True, True]]))
    b = Rows([np.array([[[[7.0]]], [[[8.0]]]])], [np.array([[[[-7.0]]], [[[-8.0]]]])],
             np.array([[True], [True]]))
    j = join_rows([a, b], NUMPY_OPS)
    np.testing.assert_array_equal(j.keys[0][:, 0, :, 0], [[1, 2, 3], [0, 0, 7], [0, 0, 8]])
    np.testing.assert_array_equal(j.values[0][:, 0, :, 0], [[-1, -2, -3], [0, 0, -7], [0, 0, -8]])
    np.testing.assert_array_equal(j.valid, [[1, 1, 1], [0, 0, 1], [0, 0, 1]])
    k = keep_rows(j, [2, 1])  # row 0 leaves: the two columns only it used go with it
    np.testing.assert_array_equal(k.keys[0][:, 0, :, 0], [[8], [7]])
    np.testing.assert_array_equal(k.valid, [[True], [True]])
    assert keep_rows(j, [0, 2]).valid.shape == (2, 3)


@pytest.fixture(scope="module")
def graphs(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("inflight")
    made = {}

    def get(family):
        if family not in made:
            lower_checkpoint(tiny_ckpt[family], root / family, "float32")
            made[family] = root / family
        return made[family]

    return get


def _runner(runtime, family, tiny_ckpt, graphs) -> Runner:
    model = (ReferenceStep(ReferenceModel.load(tiny_ckpt[family])) if runtime == "reference"
             else OnnxModel.load(graphs(family)))
    return Runner(model, None, set(), {})


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("runtime", ["reference", "onnxruntime"])
@pytest.mark.parametrize("family", ["llama", "hunyuan", "qwen2_moe"])
def test_rows_that_join_and_leave_get_their_solo_greedy_tokens(runtime, family, tiny_ckpt,
                                                               graphs):
    runner = _runner(runtime, family, tiny_ckpt, graphs)
    assert can_rebatch(runner.model)
    # key -> (prompt, tokens, the step it joins at)
    plan = {"a": (_prompt(11, 1), 30, 0), "b": (_prompt(4, 2), 12, 5), "c": (_prompt(19, 3), 1, 5),
            "d": (_prompt(7, 4), 20, 9), "e": (_prompt(2, 5), 16, 20)}
    batch, got = InflightBatch(runner), {k: [] for k in plan}
    for step in range(60):
        joining = [k for k, (_, _, at) in plan.items() if at == step]
        if joining:
            events = batch.add(joining, [plan[k][0] for k in joining],
                               [SamplingParams(max_new_tokens=plan[k][1], ignore_eos=True)
                                for k in joining])
        else:
            events = batch.step()
        for e in events:
            got[e.request].append(e.token_id)
        if len(batch):  # the cache is as long as the longest row still running, no longer
            longest = max(len(s.seen) for s in batch.streams) - 1  # last token not yet fed
            assert batch.cache.valid.shape[1] == longest
            assert batch.cache.valid.sum(1).tolist() == [len(s.seen) - 1 for s in batch.streams]
    assert len(batch) == 0 and batch.cache is None
    oracle = ReferenceModel.load(tiny_ckpt[family])
    for k, (prompt, n, _) in plan.items():
        assert got[k] == greedy(oracle, torch.tensor([prompt]), n)[0].tolist(), k


def test_a_late_short_request_finishes_before_an_early_long_one(tiny_ckpt, graphs):
    runner = _runner("reference", "llama", tiny_ckpt, graphs)
    order, stats = _finish_order(runner, inflight=True)
    assert order == ["short", "long"] and stats.mode == "inflight"
    assert stats.largest_batch == 2 and stats.requests_done == 2
    order, stats = _finish_order(runner, inflight=False)  # static: it waits for the long one
    assert order == ["long", "short"] and stats.mode == "static"
    assert stats.largest_batch == 1 and stats.requests_done == 2


def _finish_order(runner: Runner, inflight: bool):
    """A 120-token request, then, once it has 3 tokens, a 3-token one: which ends first."""
    order: list[str] = []
    third_token, all_done = threading.Event(), threading.Semaphore(0)

    def sink(name):
        def on(e):
            if name == "long" and e.index == 2:
                third_token.set()
            if e.finished:
                order.append(name)
                all_done.release()
        return on

    with BatchScheduler(runner, inflight=inflight) as scheduler:
        scheduler.submit(_prompt(8, 1), SamplingParams(max_new_tokens=120, ignore_eos=True),
                         sink("long"))
        assert third_token.wait(30)
        scheduler.submit(_prompt(5, 2), SamplingParams(max_new_tokens=3, ignore_eos=True),
                         sink("short"))
        for _ in range(2):
            assert all_done.acquire(timeout=60)
    return order, scheduler.stats  # after stop: the counters are settled


def test_inflight_is_refused_for_a_runtime_without_row_operations(tiny_ckpt, graphs):
    class FixedCache:  # like TensorRT for RTX: new_cache/step only
        runtime, vocab_size, max_seq_len, max_batch_size = "tensorrt_rtx", 512, 512, 4

    assert not can_rebatch(FixedCache())
    assert not hasattr(RtxModel, "join")
    with pytest.raises(BadInput, match="inflight: the tensorrt_rtx runtime cannot add"):
        BatchScheduler(Runner(FixedCache(), None, set(), {}), inflight=True)
    assert BatchScheduler(Runner(FixedCache(), None, set(), {})).inflight is False


class Flaky(ReferenceStep):
    """The reference runtime, failing the step calls it is told to."""

    fail_at: set[int] = set()

    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def step(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("device lost")
        return super().step(*args, **kwargs)


@pytest.mark.parametrize("inflight", [True, False])
def test_a_runtime_failure_fails_the_running_requests_and_the_next_one_runs(inflight,
                                                                           tiny_ckpt):
    model = Flaky(ReferenceModel.load(tiny_ckpt["llama"]))
    model.fail_at = {6}
    got: dict[str, list] = {"a": [], "b": [], "c": []}
    ended = threading.Semaphore(0)

    def sink(name):
        def on(e):
            got[name].append(e)
            if isinstance(e, BaseException) or e.finished:
                ended.release()
        return on

    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    with BatchScheduler(Runner(model, None, set(), {}), inflight=inflight,
                        batch_window_s=0.2) as scheduler:
        scheduler.submit(_prompt(6, 1), p, sink("a"))
        scheduler.submit(_prompt(3, 2), p, sink("b"))
        for _ in range(2):
            assert ended.acquire(timeout=30)
        scheduler.submit(_prompt(4, 3), p, sink("c"))
        assert ended.acquire(timeout=30)
    for name in "ab":  # five tokens each, then the error, once
        assert [type(e) for e in got[name]][-1] is RuntimeError
        assert str(got[name][-1]) == "device lost" and len(got[name]) == 6
    expected = greedy(ReferenceModel.load(tiny_ckpt["llama"]), torch.tensor([_prompt(4, 3)]), 10)
    assert [e.token_id for e in got["c"]] == expected[0].tolist()
    stats = scheduler.stats
    assert (stats.requests_failed, stats.requests_done) == (2, 1)


@pytest.mark.parametrize("inflight", [True, False])
def test_stopping_answers_running_and_waiting_requests(inflight, tiny_ckpt, graphs):
    runner = _runner("reference", "llama", tiny_ckpt, graphs)
    got: dict[str, list] = {"running": [], "waiting": []}
    started = threading.Event()

    def sink(name):
        def on(e):
            got[name].append(e)
            started.set()
        return on

    scheduler = BatchScheduler(runner, max_batch_size=1, inflight=inflight).start()
    scheduler.submit(_prompt(6, 1), SamplingParams(max_new_tokens=400, ignore_eos=True),
                     sink("running"))
    assert started.wait(30)
    scheduler.submit(_prompt(6, 2), SamplingParams(max_new_tokens=4), sink("waiting"))
    scheduler.stop()
    for name in got:
        assert isinstance(got[name][-1], RuntimeError), name
        assert "shutting down" in str(got[name][-1])
    assert len(got["waiting"]) == 1 and len(got["running"]) < 400
