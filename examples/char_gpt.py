"""A small GPT-style character model trained on Python's own standard-library source code.

Run (two workers on one machine, checkpoints kept best-3 by validation loss):

    elastic-run --standalone --nproc-per-node 2 --checkpoint-dir runs/char_gpt examples/char_gpt.py

The corpus is the .py files of the running interpreter's standard library (found with
sysconfig), so nothing is downloaded. It is tokenised once into a token file (--data-dir)
that every process memory-maps, as a real job would map a pre-tokenised corpus of billions
of tokens: a sample is one window of it, read on demand by the loop's DataLoader workers
(--num-workers). Mixed precision: bf16 autocast on CPU; fp16 autocast and a GradScaler on
CUDA. Gradients are clipped to norm 1 and the learning rate follows a warm-up then a cosine
decay. The last 10% of the text is held out; every
--eval-every steps each rank computes the validation loss on the same held-out sequences and
saves a checkpoint with metrics={"val_loss": ...}, which the CheckpointManager uses for
best-k retention (save_every=None: these are the periodic saves, so no step is written
twice; the loop also saves the last step and on SIGTERM). Kill a worker or the whole job and run the command again: training
resumes from the latest checkpoint, at whatever world size the new run has.
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
from collections.abc import Callable

import numpy as np
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


def write_tokens(path: str, max_chars: int) -> list[str]:
    """Tokenise the corpus into `path` (uint16 character ids) unless it is there; the vocabulary.
    Every rank may run this: each writes its own temporary file and renames it into place."""
    text = load_corpus(max_chars)
    chars = sorted(set(text))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lookup = {c: i for i, c in enumerate(chars)}
        tmp = f"{path}.{os.getpid()}.tmp"
        np.array([lookup[c] for c in text], dtype=np.uint16).tofile(tmp)
        os.replace(tmp, path)
    return chars


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of `block` tokens (and their next-token targets) of a token file,
    between token positions [start, stop): memory-mapped, opened lazily in each process."""

    def __init__(self, path: str, start: int, stop: int, block: int) -> None:
        self.path, self.start, self.block = path, start, block
        self.count = (stop - start - 1) // block
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        first = self.start + i * self.block
        chunk = torch.from_numpy(self._tokens[first : first + self.block + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # a worker maps the file itself


def warmup_cosine(max_steps: int, warmup: int) -> Callable[[int], float]:
    """LambdaLR's factor: linear warm-up over `warmup` steps, then a cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, max_steps - warmup))))
    return factor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--max-chars", type=int, default=400_000)
    p.add_argument("--data-dir", default="data/char_gpt", help="where the token file is written once")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    args = p.parse_args()

    ctx = elastic.init()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", ctx.local_rank) if cuda else torch.device("cpu")
    path = os.path.join(args.data_dir, f"tokens-{args.max_chars}.u16")
    chars = write_tokens(path, args.max_chars)
    n_tokens = os.path.getsize(path) // 2  # uint16
    split = int(0.9 * n_tokens)
    train = TokenWindows(path, 0, split, args.block)
    val = TokenWindows(path, split, n_tokens, args.block)
    val_x, val_y = (torch.stack(t).to(device) for t in zip(*(val[i] for i in range(min(64, len(val))))))

    torch.manual_seed(0)
    net = CharGPT(len(chars), args.block).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None) if ctx.world_size > 1 else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.max_steps, warmup=20))
    # fp16 on CUDA needs loss scaling; bf16 (CPU) has float32's range and needs none.
    autocast = torch.autocast(device.type, dtype=torch.float16 if cuda else torch.bfloat16)
    ckpt = CheckpointManager(ctx.checkpoint_dir, keep_best=3, metric="val_loss", mode="min", keep_last=2)
    loop = elastic.TrainLoop(model=model, optimizer=optimizer, dataset=train,
                             global_batch_size=args.global_batch,
                             micro_batch_size=args.micro_batch, checkpoint=ckpt,
                             save_every=None, max_steps=args.max_steps, seed=0,
                             scheduler=scheduler, num_workers=args.num_workers,
                             persistent_workers=args.num_workers > 0, pin_memory=cuda, device=device,
                             grad_scaler=torch.amp.GradScaler("cuda") if cuda else None, clip_grad_norm=1.0)
    resumed = loop.resume()  # a collective: every rank loads, not only the one that prints
    if ctx.rank == 0:
        print(f"corpus {n_tokens} tokens, vocab {len(chars)}, {len(train)} training windows, "
              f"resuming from step {resumed or 0}")
    for step in loop:
        if step.index % args.eval_every == 0:
            # Before this step's forwards: the parameters are those after step.index
            # optimizer steps, exactly what loop.save() stores, so metric and checkpoint match.
            net.eval()
            with torch.no_grad(), autocast:
                val_loss = F.cross_entropy(net(val_x).flatten(0, 1), val_y.flatten()).item()
            net.train()
            loop.save(metrics={"val_loss": val_loss})
            if ctx.rank == 0:
                print(f"step {step.index:4d}  world {step.world_size}  accumulation "
                      f"{step.accumulation_steps}  val_loss {val_loss:.4f}", flush=True)
        for x, y in step:
            with autocast:
                logits = model(x)
            step.backward(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
    ckpt.close()
    if ctx.rank == 0:
        print(f"done at step {loop.step}; best checkpoints by val_loss: {ckpt.best()}")


if __name__ == "__main__":
    main()
