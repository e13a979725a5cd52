"""The pictures: the noise filter's loss histogram and the recall curves of a run (train.py), the
query grid (evaluate.py --show, search.py), the audit's contact sheet (audit.py)."""

import math
import textwrap
from pathlib import Path

import torch

import util

def loss_histogram(losses, stats, path, epoch=None, noisy=None):
    """The min-max normalised losses (n,) as the GMM saw them, and its two Gaussians scaled by their
    mixing weights. noisy (n,) bool, optional: the truth, as two stacked histograms."""
    seen = torch.isfinite(losses)                   # NaN: not seen this epoch (the NFB skips them)
    x = losses[seen].double()
    if len(x) == 0 or any(math.isnan(m) for m in stats["means"]):
        return                                       # nothing seen, or no GMM fitted (degenerate)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    fig, ax = util.pyplot().subplots(figsize=(6, 3.5))
    hist = dict(bins=60, range=(0, 1), density=True, alpha=0.6)
    if noisy is not None:
        nz = noisy[seen]
        ax.hist([x[~nz].numpy(), x[nz].numpy()], stacked=True, color=["tab:blue", "tab:red"],
                label=["clean (truth)", "noisy (truth)"], **hist)
    else:
        ax.hist(x.numpy(), color="tab:gray", label="losses", **hist)
    grid = torch.linspace(0, 1, 400, dtype=torch.float64)
    for k, name in enumerate(("clean", "noisy")):
        m, s, w = (float(stats[key][k]) for key in ("means", "stds", "mix"))
        pdf = w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        ax.plot(grid.numpy(), pdf.numpy(), lw=2,
                label=f"{name} component (μ={m:.2f}, σ={s:.2f}, π={w:.2f})")
    after = f", after epoch {epoch}" if epoch is not None else ""
    ax.set(xlabel="per-sample InfoNCE loss (min-max normalised)", ylabel="density",
           title="NFB: loss distribution and fitted GMM" + after)
    ax.legend(fontsize=7)
    _save(fig, path, 110)

def recall_curves(history, path):
    """Validation recalls against the epoch: R@K on the left, Rsubset@K (where the dataset has
    subsets) on the right, a marker and line style per metric: curves near 100% stay apart."""
    epochs = [r["epoch"] for r in history]
    groups = [[k for k in history[0]["metrics"] if k.startswith(p)] for p in ("R@", "Rsubset@")]
    groups = [g for g in groups if g]
    fig, axes = util.pyplot().subplots(1, len(groups), figsize=(4.2 * len(groups), 3.5),
                                       squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for j, k in enumerate(keys):
            ax.plot(epochs, [r["metrics"][k] for r in history], marker="osd^v"[j % 5],
                    linestyle=("-", "--", ":", "-.")[j % 4], label=k)
        ax.set(xlabel="epoch", ylabel="recall (%)", title="validation "
               + ("Recall_subset" if keys[0].startswith("Rsubset") else "Recall"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, 110)

def query_grid(rows, path):
    """A row per query: the reference and its text, the top-k images, the target framed in green; a
    target the top-k missed last, in red, with its rank. rows: [(ref_path, text, [(path,
    is_target), ...], optional (target_path, rank or None) or None)]."""
    rows = [(*r, None) if len(r) == 3 else r for r in rows]
    k = max(len(r[2]) + (r[3] is not None) for r in rows)
    fig, axes = util.pyplot().subplots(len(rows), k + 1, figsize=(1.8 * (k + 1), 2.0 * len(rows)),
                                       squeeze=False)
    for ax_row, (ref, text, hits, missed) in zip(axes, rows):
        _show(ax_row[0], ref)
        ax_row[0].set_title("reference", fontsize=7)
        ax_row[0].set_xlabel(text if len(text) < 60 else text[:57] + "...", fontsize=6)
        cells = [(p, f"#{j + 1}" + (" target" if is_target else ""), "green" if is_target else None)
                 for j, (p, is_target) in enumerate(hits)]          # (image, title, frame colour)
        if missed is not None and Path(missed[0]).is_file():
            rank = f", rank {missed[1]:,}" if missed[1] else ", not in the folder"
            cells.append((missed[0], "target" + rank, "red"))
        for ax, (p, title, frame) in zip(ax_row[1:], cells):
            _show(ax, p)
            ax.set_title(title, fontsize=7, color=frame or "black")
            for side in ax.spines.values():
                side.set_edgecolor(frame or "white")
                side.set_linewidth(4 if frame else 0)
        for ax in ax_row:
            ax.set(xticks=[], yticks=[])
    _save(fig, path, 100)

def audit_sheet(rows, path, blocks=2):
    """The noise audit's contact sheet, most suspicious first: the reference, the text under a label
    line (identifier, w, the target's rank, the truth where known), the labelled target, the model's
    best other image. rows: [(ref_path, text, target_path, top_path, label)], in `blocks` columns
    side by side: 24 rows make a page, not a strip."""
    per = math.ceil(len(rows) / blocks)
    blocks = math.ceil(len(rows) / per)
    fig, axes = util.pyplot().subplots(per, 4 * blocks, figsize=(5.4 * blocks, 1.25 * per),
                                       gridspec_kw=dict(width_ratios=[1, 1.35, 1, 1] * blocks),
                                       squeeze=False)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
        ax.axis("off")
    for i, (ref, text, tgt, top, label) in enumerate(rows):
        a_ref, a_txt, a_tgt, a_top = axes[i % per, 4 * (i // per):4 * (i // per) + 4]
        for ax, p, title in ((a_ref, ref, "reference"), (a_tgt, tgt, "labelled target"),
                             (a_top, top, "model's best other")):
            _show(ax, p, 128)                          # real photos: small in memory and in the PNG
            ax.axis("on")
            ax.set_title(title, fontsize=6, pad=2)
        lines = textwrap.wrap(text, 30) or [""]
        lines = lines[:5] if len(lines) <= 5 else lines[:4] + [lines[4][:27] + "..."]
        a_txt.text(0.0, 0.5, label + "\n\n" + "\n".join(lines), fontsize=6, va="center", ha="left",
                   transform=a_txt.transAxes, wrap=False)
    _save(fig, path, 80, pad=0.4, h_pad=0.3, w_pad=0.3)

def _show(ax, path, thumb=None):
    """The image at `path` in RGB on ax; thumb: shrunk to fit thumb x thumb pixels first."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if thumb:
            im.thumbnail((thumb, thumb))
    ax.imshow(im)

def _save(fig, path, dpi, **layout):
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    util.pyplot().close(fig)
