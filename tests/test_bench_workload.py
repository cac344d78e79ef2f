"""trtllm-bench JSONL in and out, located errors, synthetic and text-window workloads."""

from __future__ import annotations

import json

import pytest

from trt_pipeline.bench.workload import Request, from_text, load_jsonl, synthetic, write_jsonl
from trt_pipeline.errors import BadInput

GOOD = '{"task_id": 0, "prompt": "hello", "output_tokens": 8}'


def _write(tmp_path, *lines: str):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_valid_lines_prompt_ids_and_both(tmp_path):
    path = _write(
        tmp_path,
        GOOD,
        "",  # blank lines are skipped
        '{"task_id": 1, "input_ids": [5, 6, 7], "output_tokens": 2}',
        '{"task_id": 2, "prompt": "ignored", "input_ids": [9], "output_tokens": 1}',
    )
    assert load_jsonl(path) == [
        Request(0, "hello", None, 8),
        Request(1, None, (5, 6, 7), 2),
        Request(2, None, (9,), 1),  # input_ids wins when both are given (trtllm.md §13)
    ]


@pytest.mark.parametrize("line, field, message", [
    ('{"task_id": 1, "prompt": "x"}', "output_tokens", "required"),
    ('{"prompt": "x", "output_tokens": 3}', "task_id", "required"),
    ('{"task_id": 1, "output_tokens": 3}', "prompt", "required (or input_ids)"),
    ('{"task_id": 1, "prompt": "x", "output_tokens": 0}', "output_tokens", "got 0;"),
    ('{"task_id": 1, "prompt": "x", "output_tokens": "3"}', "output_tokens", "got '3';"),
    ('{"task_id": true, "prompt": "x", "output_tokens": 3}', "task_id", "got True;"),
    ('{"task_id": 1, "prompt": "", "output_tokens": 3}', "prompt", "got '';"),
    ('{"task_id": 1, "input_ids": [], "output_tokens": 3}', "input_ids", "got [];"),
    ('{"task_id": 1, "input_ids": [1, "a"], "output_tokens": 3}', "input_ids.1", "got 'a';"),
    ('{"task_id": 1, "input_ids": [1, -2], "output_tokens": 3}', "input_ids.1", "got -2;"),
    ('{"task_id": 1, "promt": "x", "output_tokens": 3}', "promt",
     "unknown key. Did you mean prompt?"),
    ('{"task_id": 1, "prompt": "x", "output_tokens": 3, "lora_request": {"lora_name": "a"}}',
     "lora_request", "not supported"),
    ('{"task_id": 1, "prompt": "x", "output_tokens": 3, "media_paths": ["a.png"]}',
     "media_paths", "not supported"),
])
def test_each_invalid_line_names_file_line_and_field(tmp_path, line, field, message):
    path = _write(tmp_path, GOOD, line)
    with pytest.raises(BadInput) as err:
        load_jsonl(path)
    assert f"data.jsonl:2  {field}: {message}" in str(err.value)
    # a misspelt prompt also leaves the line with neither prompt nor input_ids
    assert len(err.value.problems) == (2 if field == "promt" else 1)


@pytest.mark.parametrize("line, message", [
    ('{"task_id": 1, "prompt": "x", ', "not valid JSON"),
    ('[1, 2, 3]', "got a JSON list; expected an object"),
])
def test_lines_that_are_not_objects(tmp_path, line, message):
    path = _write(tmp_path, GOOD, line)
    with pytest.raises(BadInput) as err:
        load_jsonl(path)
    assert f"data.jsonl:2  {message}" in str(err.value)


def test_all_bad_lines_are_reported_at_once(tmp_path):
    path = _write(tmp_path, GOOD, '{"task_id": 1}', GOOD, '{"task_id": 2, "prompt": "x"}')
    with pytest.raises(BadInput) as err:
        load_jsonl(path)
    text = str(err.value)
    assert "3 problems" in text  # line 2: prompt and output_tokens; line 4: output_tokens
    assert "data.jsonl:2  output_tokens: required" in text
    assert "data.jsonl:2  prompt: required (or input_ids)" in text
    assert "data.jsonl:4  output_tokens: required" in text


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(BadInput, match="no requests"):
        load_jsonl(_write(tmp_path, ""))
    with pytest.raises(BadInput, match="cannot read workload"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_round_trip_in_trtllm_bench_format(tmp_path):
    requests = [Request(0, None, (1, 2, 3), 4), Request(7, "a prompt", None, 16)]
    path = tmp_path / "out" / "w.jsonl"
    write_jsonl(requests, path)
    assert load_jsonl(path) == requests
    first, second = path.read_text().splitlines()
    # the shape `trtllm-bench prepare-dataset` writes: compact, task_id first
    assert first == '{"task_id":0,"input_ids":[1,2,3],"output_tokens":4}'
    assert json.loads(second) == {"task_id": 7, "prompt": "a prompt", "output_tokens": 16}


def test_synthetic_is_reproducible_by_seed():
    a = synthetic(20, 64, 16, 8.0, 4.0, vocab_size=1000, seed=3)
    assert a == synthetic(20, 64, 16, 8.0, 4.0, vocab_size=1000, seed=3)
    assert a != synthetic(20, 64, 16, 8.0, 4.0, vocab_size=1000, seed=4)


def test_synthetic_exact_lengths_without_stddev():
    reqs = synthetic(12, 128, 32, 0.0, 0.0, vocab_size=500, seed=0)
    assert [len(r.input_ids or ()) for r in reqs] == [128] * 12
    assert [r.output_tokens for r in reqs] == [32] * 12
    assert [r.task_id for r in reqs] == list(range(12))
    for r in reqs:
        assert r.prompt is None
        assert all(0 <= t < 500 for t in r.input_ids or ())
        assert len(set(r.input_ids or ())) == 128  # distinct, as random.sample in trtllm-bench


def test_synthetic_normal_lengths_are_clipped_to_one():
    reqs = synthetic(2000, 100, 3, 20.0, 10.0, vocab_size=50, seed=1)
    isls = [len(r.input_ids or ()) for r in reqs]
    osls = [r.output_tokens for r in reqs]
    assert min(osls) == 1  # mean 3, std 10: many draws fall below 1 and are clipped
    assert 95 < sum(isls) / len(isls) < 106  # ceil adds ~0.5 to a mean of 100
    assert max(isls) > 130 and min(isls) < 70
    assert all(0 <= t < 50 for r in reqs for t in r.input_ids or ())  # isl > vocab: with repeats


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(BadInput, match="isl: got 0"):
        synthetic(1, 0, 1, 0.0, 0.0, vocab_size=10, seed=0)
    with pytest.raises(BadInput, match="must be >= 0"):
        synthetic(1, 1, 1, -1.0, 0.0, vocab_size=10, seed=0)


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]  # a character-level tokenizer: exact and inspectable


def test_from_text_windows(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    reqs = from_text(path, isl=40, osl=8, count=10, tokenizer_encode=_chars, seed=5)
    assert reqs == from_text(path, 40, 8, 10, _chars, 5)
    encoded = _chars(text)
    starts = set()
    for r in reqs:
        ids = list(r.input_ids or ())
        assert len(ids) == 40 and r.output_tokens == 8
        start = ids[0] - ord("a")
        # a contiguous window of the encoded text, at some offset congruent to its first letter
        assert any(encoded[s:s + 40] == ids for s in range(start, 461, 26))
        starts.add(tuple(ids))
    assert len(starts) > 1


def test_from_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abc", encoding="utf-8")
    with pytest.raises(BadInput) as err:
        from_text(path, isl=10, osl=1, count=1, tokenizer_encode=_chars, seed=0)
    assert "short.txt  isl: the text has 3 tokens; need at least 10" in str(err.value)
