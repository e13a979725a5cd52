"""The pictures: the noise filter's loss histogram and the recall curves of a run (train.py), the query
grid (evaluate.py --show, search.py), the audit's contact sheet (audit.py)."""

import math
import textwrap
from pathlib import Path

import torch

import util


def loss_histogram(losses, stats, path, epoch=None, noisy=None):
    """Histogram of the min-max normalised per-sample losses and the two fitted Gaussians (scaled by their
    mixing weights), as the GMM saw them. losses (n,) may hold NaN (samples not seen this epoch).
    noisy (n,) bool, optional: ground truth, drawn as two stacked histograms."""
    seen = torch.isfinite(losses)                   # NaN: not seen this epoch (as the NFB itself skips them)
    x = losses[seen].double()
    if len(x) == 0 or any(math.isnan(m) for m in stats["means"]):
        return                                       # nothing seen, or the GMM was not fitted (degenerate)
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    plt = util.pyplot()
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
    """Validation recalls against the epoch: R@K on the left, Rsubset@K (where the dataset has subsets) on the
    right, each metric its own marker and line style, so that curves near 100% do not hide one another."""
    epochs = [r["epoch"] for r in history]
    groups = [[k for k in history[0]["metrics"] if k.startswith(p)] for p in ("R@", "Rsubset@")]
    groups = [g for g in groups if g]
    plt = util.pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.5), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for j, k in enumerate(keys):
            ax.plot(epochs, [r["metrics"][k] for r in history], marker="osd^v"[j % 5],
                    linestyle=("-", "--", ":", "-.")[j % 4], label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("recall (%)")
        ax.set_title("validation " + ("Recall_subset" if keys[0].startswith("Rsubset") else "Recall"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def query_grid(rows, path):
    """One row per query: the reference image, its modification text, then the top-k retrieved images with the
    true target framed in green; a target the top-k missed comes last, framed in red, with its rank. rows:
    [(ref_path, text, [(path, is_target), ...], (target_path, rank or None) or None)]; the 4th item is optional."""
    from PIL import Image
    rows = [(*r, None) if len(r) == 3 else r for r in rows]
    k = max(len(r[2]) + (r[3] is not None) for r in rows)
    plt = util.pyplot()
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.8 * (k + 1), 2.0 * len(rows)), squeeze=False)
    for ax_row, (ref, text, hits, missed) in zip(axes, rows):
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
            elif j == len(hits) and missed is not None and Path(missed[0]).is_file():
                with Image.open(missed[0]) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title("target" + (f", rank {missed[1]:,}" if missed[1] else ", not in the folder"),
                             fontsize=7, color="red")
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(4)
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
    plt = util.pyplot()
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
