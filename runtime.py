"""The run's plumbing, outside the paper: one process or many, checkpoints that survive a kill, logs a script reads.

  processes    setup_distributed (plain python, or torchrun: NCCL on GPUs, Gloo on CPUs), gather_with_grad
               (the global batch's targets for every rank's queries), merge_losses (NFB's per-sample losses of
               all ranks, so every rank fits the same GMM)
  checkpoints  atomic_save (temp file + rename), rng_state / set_rng_state (exact resume: torch, Python,
               NumPy and CUDA generators), load_checkpoint (weights_only, one-line errors), build_model
  precision    autocast (bf16 where the GPU has it, else fp16 with a gradient scaler; CPU: fp32)
  logs         strict_json (NaN -> null in the JSON lines), log (rank 0 only, above the progress bars),
               error_line (a bad-input error as the one line the command line prints), ArgumentParser (bad
               flags in one line)
  plots        PNGs next to a run's log: the NFB's loss histogram with its fitted GMM (a picture says whether the
               noise filter can work at all: if clean and noisy losses form no two modes, no GMM tells them
               apart), recall curves, the query grid of `evaluate.py --show`, the audit's contact sheet
"""

import argparse
import math
import os
import random
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import CIRModel, build_clip


# -----------------------------------------------------------------------------
# distributed helpers: the same script runs with one process or under torchrun

def setup_distributed():
    """(rank, world, device): one process, or torchrun's (NCCL on GPUs, Gloo on CPUs)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
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


def gather_rows(x, n):
    """Every rank's contiguous share of n rows (x: this rank's, torch.tensor_split's sizes) -> all n rows, in
    order, on every rank. One process: x itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    sizes = [len(s) for s in torch.tensor_split(torch.arange(n), dist.get_world_size())]
    pad = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[:len(x)] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


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


def load_checkpoint(path, flag="--checkpoint"):
    """A run's checkpoint (best.pt / last.pt), loaded with weights_only=True. Clear errors, no tracebacks."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found (train one with `python train.py`, "
                         f"then pass {flag} runs/<run>/{'last' if flag == '--resume' else 'best'}.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); it may be truncated "
                         f"or corrupt: use the run's other file (best.pt / last.pt) or retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of this project (expected a dict with 'model' and "
                         f"'args', as train.py writes; for OpenAI CLIP weights use --clip {path})")
    return ckpt


def build_model(ckpt):
    """CIRModel from a checkpoint: CLIP's architecture is inferred from the weights' shapes (build_clip)."""
    a = ckpt["args"]
    clip = build_clip({k[5:]: v for k, v in ckpt["model"].items() if k.startswith("clip.")})
    model = CIRModel(clip, wcb=not a["no_wcb"], n_maps=a["wcb_maps"], wcb_hidden=a["wcb_hidden"])
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# precision

def autocast(amp, device):
    """--amp on this device -> (autocast context, GradScaler). GPU: bf16 where supported, else fp16 with a gradient
    scaler; CPU or --amp none: full precision, and the scaler is disabled (its calls pass through)."""
    if device.type != "cuda" or amp == "none":
        return nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


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


# -----------------------------------------------------------------------------
# plots

def _pyplot():
    """matplotlib on the Agg backend (no display on training machines), imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_histogram(losses, stats, path, epoch=None, noisy=None):
    """Histogram of the min-max normalised per-sample losses and the two fitted Gaussians (scaled by their
    mixing weights), as the GMM saw them. losses (n,) may hold NaN (samples not seen this epoch).
    noisy (n,) bool, optional: ground truth, drawn as two stacked histograms."""
    seen = torch.isfinite(losses)                   # NaN: not seen this epoch (as the NFB itself skips them)
    x = losses[seen].double()
    if len(x) == 0 or any(math.isnan(m) for m in stats["means"]):
        return                                       # nothing seen, or the GMM was not fitted (degenerate)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 60
    if noisy is not None:
        nz = noisy[seen]
        ax.hist([x[~nz].numpy(), x[nz].numpy()], bins=bins, range=(0, 1), density=True, stacked=True,
                color=["tab:blue", "tab:red"], alpha=0.6, label=["clean (truth)", "noisy (truth)"])
    else:
        ax.hist(x.numpy(), bins=bins, range=(0, 1), density=True, color="tab:gray", alpha=0.6, label="losses")
    grid = torch.linspace(0, 1, 400, dtype=torch.float64)
    names = ["clean component", "noisy component"]
    for k in range(2):
        m, s, w = (float(stats[key][k]) for key in ("means", "stds", "mix"))
        pdf = w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        ax.plot(grid.numpy(), pdf.numpy(), lw=2, label=f"{names[k]} (μ={m:.2f}, σ={s:.2f}, π={w:.2f})")
    ax.set_xlabel("per-sample InfoNCE loss (min-max normalised)")
    ax.set_ylabel("density")
    ax.set_title("NFB: loss distribution and fitted GMM" + (f", after epoch {epoch}" if epoch is not None else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recall_curves(history, path):
    """Validation recalls against the epoch, one line per metric. history: the run's JSON-line records."""
    epochs = [r["epoch"] for r in history]
    keys = [k for k in history[0]["metrics"] if k.startswith(("R@", "Rsubset@"))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        ax.plot(epochs, [r["metrics"][k] for r in history], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("recall (%)")
    ax.set_title("validation recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def query_grid(rows, path):
    """One row per query: the reference image, its modification text, then the top-k retrieved images with the
    true target framed in green. rows: [(ref_path, text, [(path, is_target), ...])]."""
    from PIL import Image
    k = max(len(r[2]) for r in rows)
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.8 * (k + 1), 2.0 * len(rows)), squeeze=False)
    for ax_row, (ref, text, hits) in zip(axes, rows):
        with Image.open(ref) as im:
            ax_row[0].imshow(im.convert("RGB"))
        ax_row[0].set_title("reference", fontsize=7)
        ax_row[0].set_xlabel(text if len(text) < 60 else text[:57] + "...", fontsize=6)
        for j, ax in enumerate(ax_row[1:]):
            if j < len(hits):
                hit_path, is_target = hits[j]
                with Image.open(hit_path) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title(f"#{j + 1}" + (" target" if is_target else ""), fontsize=7,
                             color="green" if is_target else "black")
                for side in ax.spines.values():
                    side.set_edgecolor("green" if is_target else "white")
                    side.set_linewidth(4 if is_target else 0)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def audit_sheet(rows, path, blocks=2):
    """The noise audit's contact sheet: one row per suspect triplet, most suspicious first: the reference image, the
    modification text (wrapped) under a label line (identifier, w, the target's rank, the truth where known), the
    labelled target, and the model's best other image. rows: [(ref_path, text, target_path, top_path, label)];
    laid out in `blocks` side-by-side columns of rows so that 24 rows make a page, not a strip."""
    from PIL import Image
    per = math.ceil(len(rows) / blocks)
    blocks = math.ceil(len(rows) / per)
    plt = _pyplot()
    fig, axes = plt.subplots(per, 4 * blocks, figsize=(5.4 * blocks, 1.25 * per), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1, 1.35, 1, 1] * blocks))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for i, (ref, text, tgt, top, label) in enumerate(rows):
        a_ref, a_txt, a_tgt, a_top = axes[i % per, 4 * (i // per):4 * (i // per) + 4]
        for ax, p, title in ((a_ref, ref, "reference"), (a_tgt, tgt, "labelled target"),
                             (a_top, top, "model's best other")):
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((128, 128))             # real photos: small in memory and in the PNG
            ax.imshow(im)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6, pad=2)
        lines = textwrap.wrap(text, 30) or [""]
        lines = lines[:5] if len(lines) <= 5 else lines[:4] + [lines[4][:27] + "..."]
        a_txt.text(0.0, 0.5, label + "\n\n" + "\n".join(lines), fontsize=6, va="center", ha="left",
                   transform=a_txt.transAxes, wrap=False)
    fig.tight_layout(pad=0.4, h_pad=0.3, w_pad=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)
