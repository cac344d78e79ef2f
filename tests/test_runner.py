"""The runner over the CPU reference model: greedy = the reference's own greedy, seeded sampling is
reproducible, batching changes nothing, stops and lengths end requests as asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_pipeline.reference.model import ReferenceModel, greedy
from trt_pipeline.runner import Runner, SamplingParams
from trt_pipeline.runner.sampling import choose


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    from conftest import DEFAULT_MODEL

    from trt_pipeline.families.apply import convert_checkpoint

    out = tmp_path_factory.mktemp("default") / "ckpt"
    convert_checkpoint(DEFAULT_MODEL, out, "float32")
    return out


def tokens(events, request=0):
    return [e.token_id for e in events if e.request == request]


def test_greedy_equals_reference_greedy(default_ckpt):
    runner = Runner.open(default_ckpt)
    prompt = runner.encode("ROMEO:\nWhat light")
    expected = greedy(ReferenceModel.load(default_ckpt), torch.tensor([prompt]), 24)[0].tolist()
    got = tokens(runner.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True)))
    assert got == expected


def test_batch_of_different_lengths_matches_single_runs(default_ckpt):
    runner = Runner.open(default_ckpt)
    prompts = [runner.encode("JULIET:\nO Romeo"), runner.encode("To be")]
    p = SamplingParams(max_new_tokens=16, ignore_eos=True)
    batched = list(runner.generate(prompts, p))
    for i, prompt in enumerate(prompts):
        assert tokens(batched, i) == tokens(runner.generate([prompt], p))


def test_seeded_sampling_is_reproducible(default_ckpt):
    runner = Runner.open(default_ckpt)
    prompt = runner.encode("KING:")
    p = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                       ignore_eos=True)
    a, b = tokens(runner.generate([prompt], p)), tokens(runner.generate([prompt], p))
    c = tokens(runner.generate([prompt], SamplingParams(**{**p.__dict__, "seed": 8})))
    assert a == b and a != c


def test_stop_string_and_length(default_ckpt):
    runner = Runner.open(default_ckpt)
    prompt = runner.encode("ROMEO:")
    events = list(runner.generate([prompt], SamplingParams(max_new_tokens=40, stop=("king",))))
    assert events[-1].finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert "king" not in text and text  # the text stops before the stop string
    events = list(runner.generate([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True)))
    assert len(events) == 5 and events[-1].finish_reason == "length"


def test_streamed_text_is_the_tokenizers_decode(default_ckpt):
    """Joined, the events' texts are what the tokenizer decodes from prompt + output, past the
    prompt's text (decoded a few tokens at a time, not whole each step)."""
    runner = Runner.open(default_ckpt)
    prompt = runner.encode("KING:\nO")
    events = list(runner.generate([prompt], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    decode = runner.tokenizer.decode
    out = [e.token_id for e in events]
    assert "".join(e.text for e in events) == decode(prompt + out)[len(decode(prompt)):]


def test_a_stop_string_across_tokens_is_never_sent_in_part(default_ckpt):
    runner = Runner.open(default_ckpt)
    prompt = runner.encode("ROMEO:")
    free = list(runner.generate([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True)))
    text = "".join(e.text for e in free)
    pieces = [runner.tokenizer.decode([e.token_id]) for e in free]
    # a stop string made of the end of one token's text and the start of the next ones'
    k = next(i for i in range(8, len(pieces)) if len(pieces[i]) > 1 and pieces[i + 1].strip())
    stop = pieces[k][1:] + pieces[k + 1] + pieces[k + 2]
    events = list(runner.generate([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True,
                                                           stop=(stop,))))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[:text.find(stop)]


def test_chat_template_is_the_tokenizers(default_ckpt):
    runner = Runner.open(default_ckpt)
    ids = runner.encode("Who art thou?", chat=True)
    assert runner.tokenizer.decode(ids) == "<|bos|><|user|>Who art thou?<|eos|><|assistant|>"


def test_choose_top_k_top_p_and_penalty():
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert choose(logits, [], SamplingParams(), rng) == 1
    # the penalty divides the seen positive logit: 3/4 < 2, so greedy moves to token 2
    assert choose(logits, [1], SamplingParams(repetition_penalty=4.0), rng) == 2
    picks = {choose(logits, [], SamplingParams(temperature=1.0, top_k=2, seed=None), rng)
             for _ in range(200)}
    assert picks == {1, 2}
    # top_p 0.5: token 1 alone holds softmax mass 0.66 > 0.5
    picks = {choose(logits, [], SamplingParams(temperature=1.0, top_p=0.5), rng)
             for _ in range(50)}
    assert picks == {1}


class ReferenceGenerating:
    """A runtime that owns its decoding loop (as TensorRT-LLM's executor does), made of the
    reference model's own greedy decoding, so the runner's generating path has an oracle."""

    runtime = "reference-generating"
    max_batch_size = 4
    max_seq_len = 1024

    def __init__(self, ckpt):
        self.model = ReferenceModel.load(ckpt)
        self.vocab_size = self.model.desc.vocab_size

    def stream(self, prompts, request):
        outs = [greedy(self.model, torch.tensor([p]), request.max_new_tokens)[0].tolist()
                for p in prompts]
        for n in range(1, request.max_new_tokens + 1):
            yield [o[:n] for o in outs]


def test_generating_runtime_path_equals_step_path(default_ckpt):
    step = Runner.open(default_ckpt)
    gen = Runner(ReferenceGenerating(default_ckpt), step.tokenizer, step.eos_ids, {})
    prompts = [step.encode("ROMEO:"), step.encode("JULIET:\nAy me")]
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a, b = list(step.generate(prompts, p)), list(gen.generate(prompts, p))
    for i in range(2):
        assert tokens(a, i) == tokens(b, i)
        assert "".join(e.text for e in a if e.request == i) == \
            "".join(e.text for e in b if e.request == i)
    stop = SamplingParams(max_new_tokens=40, stop=("king",))
    assert [e.finish_reason for e in gen.generate(prompts[:1], stop)][-1] == "stop"
