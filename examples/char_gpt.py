"""A small GPT-style character model trained on Python's own standard-library source code.

Run (two workers on one machine, checkpoints kept best-3 by validation loss):

    elastic-run --standalone --nproc-per-node 2 --checkpoint-dir runs/char_gpt examples/char_gpt.py

The corpus is the .py files of the running interpreter's standard library (found with
sysconfig), so nothing is downloaded. The last 10% of the text is held out; every
--eval-every steps each rank computes the validation loss on the same held-out sequences and
saves a checkpoint with metrics={"val_loss": ...}, which the CheckpointManager uses for
best-k retention (save_every=None: these are the periodic saves, so no step is written
twice; the loop also saves the last step and on SIGTERM). Kill a worker or the whole job and run the command again: training
resumes from the latest checkpoint, at whatever world size the new run has.
"""

from __future__ import annotations

import argparse
import os
import sysconfig

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import elastic
from checkpoint import CheckpointManager

STDLIB_FILES = ["textwrap.py", "string.py", "shlex.py", "fractions.py", "difflib.py",
                "calendar.py", "heapq.py", "bisect.py", "functools.py", "argparse.py"]


def load_corpus(max_chars: int) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in STDLIB_FILES:
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)[:max_chars]


class CharGPT(nn.Module):
    def __init__(self, vocab: int, block: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(block),
                             persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        h = self.blocks(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def windows(ids: torch.Tensor, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids[i : i + block], ids[i + 1 : i + block + 1])
            for i in range(0, len(ids) - block - 1, block)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--max-chars", type=int, default=400_000)
    args = p.parse_args()

    ctx = elastic.init()
    text = load_corpus(args.max_chars)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    train, val = windows(ids[:split], args.block), windows(ids[split:], args.block)[:64]
    val_x = torch.stack([x for x, _ in val])
    val_y = torch.stack([y for _, y in val])

    torch.manual_seed(0)
    net = CharGPT(len(chars), args.block)
    model = DistributedDataParallel(net) if ctx.world_size > 1 else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.max_steps)
    ckpt = CheckpointManager(ctx.checkpoint_dir, keep_best=3, metric="val_loss", mode="min", keep_last=2)
    loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=train,
                             global_batch_size=args.global_batch,
                             micro_batch_size=args.micro_batch, checkpoint=ckpt,
                             save_every=None, max_steps=args.max_steps, seed=0,
                             scheduler=scheduler)
    resumed = loop.resume()  # a collective: every rank loads, not only the one that prints
    if ctx.rank == 0:
        print(f"corpus {len(text)} chars, vocab {len(chars)}, {len(train)} training windows, "
              f"resuming from step {resumed or 0}")
    for step in loop:
        if step.index % args.eval_every == 0:
            # Before this step's forwards: the parameters are those after step.index
            # optimizer steps, exactly what loop.save() stores, so metric and checkpoint match.
            net.eval()
            with torch.no_grad():
                val_loss = F.cross_entropy(net(val_x).flatten(0, 1), val_y.flatten()).item()
            net.train()
            loop.save(metrics={"val_loss": val_loss})
            if ctx.rank == 0:
                print(f"step {step.index:4d}  world {step.world_size}  accumulation "
                      f"{step.accumulation_steps}  val_loss {val_loss:.4f}", flush=True)
        for x, y in step:
            logits = model(x)
            step.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    ckpt.close()
    if ctx.rank == 0:
        print(f"done at step {loop.step}; best checkpoints by val_loss: {ckpt.best()}")


if __name__ == "__main__":
    main()
