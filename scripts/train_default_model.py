"""Train the embedded default model: a tiny LLaMA-shape decoder on Shakespeare.

Why: the main job and the quantization tests need a model whose activations look like a trained
model's (outliers, structure) and whose widths are multiples of 128 so that group-128 INT4 applies,
without downloading anything. The result (a few MB) is committed under
`trt_pipeline/data/default_model/`, with the calibration and held-out text slices beside it.

    python scripts/train_default_model.py --corpus ../shared/data/tinyshakespeare.txt

Deterministic for a given torch build (seeded, single process).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parents[1] / "trt_pipeline" / "data"
TRAIN_BYTES = 1_000_000  # the rest of the corpus is held out
CALIB_CHARS = 60_000
HELDOUT_CHARS = 40_000
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("../shared/data/tinyshakespeare.txt"))
    ap.add_argument("--out", type=Path, default=DATA / "default_model")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    text = args.corpus.read_text(encoding="utf-8")
    train_text, heldout_text = text[:TRAIN_BYTES], text[TRAIN_BYTES:]
    (DATA / "calib.txt").write_text(train_text[-CALIB_CHARS:], encoding="utf-8")
    (DATA / "heldout.txt").write_text(heldout_text[:HELDOUT_CHARS], encoding="utf-8")

    tokenizer = train_tokenizer(train_text, vocab_size=2048)
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    print(f"corpus: {len(ids)} tokens, vocab {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s : s + args.seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s")

    model.eval()
    held = torch.tensor(tokenizer(heldout_text[:HELDOUT_CHARS])["input_ids"][:4096])
    with torch.no_grad():
        nll = [
            model(input_ids=held[i : i + 256][None], labels=held[i : i + 256][None]).loss.item()
            for i in range(0, len(held) - 256, 256)
        ]
    print(f"held-out perplexity {math.exp(sum(nll) / len(nll)):.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.max_new_tokens = 64
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    info = {"steps": args.steps, "train_tokens": args.steps * args.batch * args.seq}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
