"""The run's plumbing, outside the paper: one process or many, checkpoints that survive a kill, logs a script reads.

  processes    setup_distributed (plain python, or torchrun: NCCL on GPUs, Gloo on CPUs), gather_with_grad
               (the global batch's targets for every rank's queries), merge_losses (NFB's per-sample losses of
               all ranks, so every rank fits the same GMM)
  checkpoints  atomic_save (temp file + rename), rng_state / set_rng_state (exact resume: torch, Python,
               NumPy and CUDA generators)
  logs         strict_json (NaN -> null in the JSON lines), log (rank 0 only, above the progress bars),
               error_line (a bad-input error as the one line the command line prints), ArgumentParser (bad
               flags in one line)
"""

import argparse
import math
import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# -----------------------------------------------------------------------------
# distributed helpers: the same script runs with one process or under torchrun

def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    # rank 0 validates (and builds plots, checkpoints) while the others wait at a barrier: a long validation must
    # not hit the default collective timeout
    timeout = timedelta(hours=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    return rank, world, torch.device("cpu")


class _AllGather(torch.autograd.Function):
    """Forward: every rank's (B, D) rows concatenated in rank order. Backward: every rank's loss depends on every
    row, so a row's gradient is the sum over ranks of the gradients it received (all_reduce), and each rank keeps
    the slice of its own rows. DDP then averages the parameter gradients, as for any other loss."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                          # (W·B, D)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]      # (B, D)


def gather_with_grad(x):
    """All ranks' rows, in rank order, with gradients flowing back to the rank that made them. x (B, D) -> (W·B, D),
    every rank's B equal (drop_last). Every query then sees every target of the global batch, as in one process
    with the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def merge_losses(losses):
    """Per-sample losses (n,), NaN where this rank did not see the sample -> the same full vector on every rank
    (a sample padded onto two ranks by DistributedSampler gets the mean of its two losses)."""
    if not dist.is_initialized():
        return losses
    seen = (~losses.isnan()).float()
    total = torch.nan_to_num(losses)
    dist.all_reduce(total)
    dist.all_reduce(seen)
    return torch.where(seen > 0, total / seen.clamp(min=1), float("nan"))


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, exact resume

def atomic_save(obj, path):
    """Write to a temp file in the same folder, then rename: a run killed mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])        # this process's GPU (the machine may have another count)


# -----------------------------------------------------------------------------
# logs

def strict_json(x):
    """NaN / inf -> null, so that every JSON reader (jq, pandas, JavaScript) takes the log lines."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def log(msg, rank=0):
    if rank == 0:
        tqdm.write(msg)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, `error: <flag and fix>`, instead of the usage block."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def error_line(e):
    """The message of a bad-input error for the command line. An error raised in a DataLoader worker comes back with
    the worker's whole traceback as its message: its last line is the original message."""
    msg = str(e).strip()
    if "Original Traceback" not in msg:
        return msg
    last = msg.splitlines()[-1]                      # "OSError: cannot read image ..."
    return last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
