"""A tiny Hugging Face `transformers` GPT-2 trained under elastic-run, then exported to a
directory that `from_pretrained` loads.

Run (two workers on one machine; needs the `examples` extra: pip install -e ".[examples]"):

    elastic-run --standalone --nproc-per-node 2 --checkpoint-dir runs/hf_gpt2 examples/hf_gpt2.py --steps 200
    elastic-ckpt export runs/hf_gpt2 --step 200 --format hf --prefix model/ \\
        --config-entry hf_config --exclude lm_head.weight --to runs/hf_gpt2_model
    python -c "from transformers import GPT2LMHeadModel as M; print(M.from_pretrained('runs/hf_gpt2_model'))"

The model is `GPT2LMHeadModel` with a tiny `GPT2Config` built here (2 layers, 2 heads, width
64), so nothing is downloaded (HF_HUB_OFFLINE=1). It reads characters of the same offline
corpus as char_gpt.py (Python's standard-library source): the vocabulary is the corpus's
characters. The config travels inside every checkpoint as the JSON state entry "hf_config"
(the text of config.json), so the export needs nothing but the checkpoint. GPT-2 ties
`lm_head.weight` to `transformer.wte.weight`: the checkpoint holds both names, and
`--exclude lm_head.weight` leaves the copy out, as `save_pretrained` does (transformers ties
it again on load). Kill a worker or the job and run the first command again: training
resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never reach the Hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from char_gpt import TokenWindows, write_tokens  # noqa: E402  (examples/ is the script's directory)
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import elastic  # noqa: E402
from checkpoint import CheckpointManager  # noqa: E402

CONFIG_ENTRY = "hf_config"  # the checkpoint's state entry holding config.json's text


def tiny_config(vocab: int, block: int) -> GPT2Config:
    # No bos/eos token: a character vocabulary has none (GPT-2's default id 50256 is out of range).
    return GPT2Config(vocab_size=vocab, n_positions=block, n_embd=64, n_layer=2, n_head=2,
                      bos_token_id=None, eos_token_id=None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=200_000)
    p.add_argument("--data-dir", default="data/char_gpt", help="where the token file is written once")
    args = p.parse_args()

    ctx = elastic.init()
    path = os.path.join(args.data_dir, f"tokens-{args.max_chars}.u16")  # char_gpt's memory-mapped tokens
    chars = write_tokens(path, args.max_chars)
    train = TokenWindows(path, 0, os.path.getsize(path) // 2, args.block)

    config = tiny_config(len(chars), args.block)
    torch.manual_seed(0)
    net = GPT2LMHeadModel(config)
    model = DistributedDataParallel(net) if ctx.world_size > 1 else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    ckpt = CheckpointManager(ctx.checkpoint_dir, keep_last=2)
    loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=train,
                             global_batch_size=args.global_batch,
                             micro_batch_size=args.micro_batch, checkpoint=ckpt,
                             save_every=args.save_every, max_steps=args.steps, seed=0,
                             extra_state={CONFIG_ENTRY: config.to_json_string()})
    resumed = loop.resume()  # a collective: every rank loads, not only the one that prints
    if ctx.rank == 0:
        print(f"GPT-2 with {net.num_parameters()} parameters, vocab {len(chars)}, "
              f"{len(train)} training windows, resuming from step {resumed or 0}", flush=True)
    for step in loop:
        for x, y in step:
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            step.backward(loss)
        if ctx.rank == 0 and step.index % 10 == 0:
            print(f"step {step.index:4d}  world {step.world_size}  accumulation "
                  f"{step.accumulation_steps}  loss {loss.item():.4f}", flush=True)
    ckpt.close()
    if ctx.rank == 0:
        print(f"done at step {loop.step}; checkpoints in {ctx.checkpoint_dir}")


if __name__ == "__main__":
    main()
