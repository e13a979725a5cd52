"""Training: NCL-CIR (WCB + NFB + soft-label NCE) and SPN's stage 2, on one CPU, one GPU or many (torchrun).

    python train.py                                    # toy benchmark, tiny CLIP from scratch, CPU, minutes
    python train.py --dataset cirr --data-root DIR     # CIRR, pretrained CLIP (default RN50x4)
    python train.py --dataset fashioniq --data-root DIR --categories dress shirt toptee
    python train.py --dataset shoes --data-root DIR    # Shoes: validation on its test split (it has no val)
    torchrun --nproc_per_node 4 train.py --dataset cirr --data-root DIR
    python train.py --stage 2 --init runs/X/best.pt    # SPN stage 2 (spn.py): static bank of all training targets
    python train.py --resume runs/X                    # continue a killed run where its last epoch ended

One epoch (README: "What follows the paper", row "schedule"):
  1. every step: q = normalize(f_txt + f_ref), t = normalize(f_tar); loss = L^soft_NCE(q, t, w) + λ·diversity,
     with w = 1 (plain InfoNCE) during the warm-up epochs; the per-sample InfoNCE losses are recorded for free;
  2. NFB: fit a 2-component GMM to the epoch's per-sample losses -> soft labels w for the next epoch
     (--nfb-losses eval recomputes the losses in an extra no-grad pass in fixed chunks instead);
  3. validate, log one JSON line, plot, save last.pt atomically (and best.pt on a new best).
"""

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import evaluate
import plots
import spn
import toy
from cir import CIRModel
from loss import SOFT_FORMS, gallery_nce, info_nce, soft_nce
from model import load_clip, make_transform, normalize_pixels, tokenize
from nfb import NoiseFilter
from runtime import (ArgumentParser, atomic_save, error_line, gather_with_grad, log, merge_losses, rng_state,
                     set_rng_state, setup_distributed, strict_json)

# Defaults per dataset; every one can be overridden on the command line (None = take from here).
DEFAULTS = {
    "toy": dict(clip="tiny", epochs=7, batch_size=128, lr=1e-3, lr_wcb=1e-3, wd=0.05, tau=0.05, noise=0.3,
                transform="clip", warmup_epochs=1, lr_warmup=0.05, cache_images=True, group_batches=True),
    "cirr": dict(clip="RN50x4", epochs=10, batch_size=128, lr=2e-6, lr_wcb=1e-4, wd=0.05, tau=0.01, noise=0.0,
                 transform="targetpad", warmup_epochs=1, lr_warmup=0.05, cache_images=False, group_batches=False),
    "fashioniq": dict(clip="RN50x4", epochs=10, batch_size=128, lr=2e-6, lr_wcb=1e-4, wd=0.05, tau=0.01, noise=0.0,
                      transform="targetpad", warmup_epochs=1, lr_warmup=0.05, cache_images=False,
                      group_batches=False),
    "shoes": dict(clip="RN50x4", epochs=10, batch_size=128, lr=2e-6, lr_wcb=1e-4, wd=0.05, tau=0.01, noise=0.0,
                  transform="targetpad", warmup_epochs=1, lr_warmup=0.05, cache_images=False, group_batches=False),
}
RUN = dict(amp="auto", workers=2)  # not tied to a dataset; on --resume the run's own values unless given again
STAGE2 = {  # SPN stage 2: SPN's settings for CLIP4Cir on real data; the toy's CLIP is trained from scratch
    "toy": dict(epochs=3, lr=1e-4, lr_wcb=1e-4),
    "cirr": dict(epochs=3, lr=2e-5, tau=0.02),
    "fashioniq": dict(epochs=3, lr=2e-5, tau=0.02),
    "shoes": dict(epochs=3, lr=2e-5, tau=0.02),
}


def get_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--dataset", default="toy", choices=list(DEFAULTS))
    p.add_argument("--data-root", default=None, help="dataset folder (toy: generated there if missing)")
    p.add_argument("--categories", nargs="+", default=["dress", "shirt", "toptee"], help="FashionIQ categories")
    p.add_argument("--clip", default=None, help="OpenAI model name, a checkpoint path, or a tiny config")
    p.add_argument("--encoder", default="both", choices=["both", "text", "image"], help="what of CLIP is fine-tuned")
    p.add_argument("--transform", default=None, choices=["clip", "targetpad"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split over the processes)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of CLIP's weights")
    p.add_argument("--lr-wcb", type=float, default=None, help="learning rate of the WCB heads")
    p.add_argument("--wd", type=float, default=None, help="AdamW weight decay (matrices only)")
    p.add_argument("--lr-warmup", type=float, default=None, help="fraction of the steps with linear LR warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=None, help="temperature of the logits q·t/τ")
    p.add_argument("--amp", default=None, choices=["auto", "bf16", "fp16", "none"], help="autocast, GPU only (auto)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (2)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every image once into RAM as uint8 at the model's resolution (toy: on)")
    p.add_argument("--noise", type=float, default=None, help="fraction of training triplets to corrupt")
    p.add_argument("--noise-kind", default="shuffle", help="how: " + ", ".join(data.NOISE_KINDS)
                   + " (shuffle: the field's protocol; see data.inject_noise)")
    p.add_argument("--group-batches", action=argparse.BooleanOptionalAction, default=None,
                   help="batches of whole groups (triplets sharing a reference image), in random order (toy: on)")
    p.add_argument("--oracle", action="store_true",
                   help="the ceiling: train only on the triplets known to be clean, for the same number of steps")
    p.add_argument("--skip-missing", action="store_true", help="drop triplets whose images are missing")
    # the method's switches (each one is an ablation)
    p.add_argument("--no-wcb", action="store_true", help="no Weight Compensation Block (plain CLIP features)")
    p.add_argument("--wcb-maps", type=int, default=2, help="K, weight maps per WCB head")
    p.add_argument("--wcb-hidden", type=int, default=0, help="WCB scorer hidden width (0: linear)")
    p.add_argument("--div-weight", type=float, default=0.1, help="λ of the WCB diversity penalty")
    p.add_argument("--no-nfb", action="store_true", help="no Noise-pair Filter Block (plain InfoNCE throughout)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs of plain InfoNCE before the first GMM")
    p.add_argument("--gmm", default="sklearn", choices=["sklearn", "torch"])
    p.add_argument("--soft-label", default="sample", choices=["sample", *SOFT_FORMS],
                   help="L^soft_NCE (loss.py): sample pair i into an epoch with probability w_i; weight its l_i by "
                   "w_i; or spread 1 - w_i over the other targets")
    p.add_argument("--nfb-losses", default="gallery", choices=["gallery", "train", "eval"],
                   help="per-sample losses for the GMM: recorded in the training pass, or an extra no-grad pass "
                   "(eval: in-batch; gallery: over every training image)")
    p.add_argument("--nfb-gate", type=float, default=0.02,
                   help="nats per pair by which two Gaussians must beat one Gamma on the losses, else every w = 1 "
                   "(no second mode: no noise; 0: never gate)")
    # SPN
    p.add_argument("--stage", type=int, default=1, choices=[1, 2], help="2: SPN static-bank stage")
    p.add_argument("--init", default=None, help="checkpoint to start from (required by --stage 2)")
    p.add_argument("--extra-triplets", default=None, help="generated positives (generate.py) added to training")
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<time>)")
    p.add_argument("--resume", default=None, help="run folder or last.pt to continue")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (debug)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="recall curves and the NFB's loss histograms as PNGs in the run folder")
    args = p.parse_args(argv)
    if args.resume:     # the run's own settings are used; main() merges --amp / --workers when given again
        return args
    d = dict(DEFAULTS[args.dataset], **RUN, **(STAGE2[args.dataset] if args.stage == 2 else {}))
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.stage == 2 and not args.init:
        p.error("--stage 2 needs --init RUN/best.pt (a stage-1 checkpoint)")
    if args.batch_size < 2:
        p.error(f"--batch-size {args.batch_size}: contrastive training needs at least 2 pairs per batch")
    try:
        data.check_noise(noise_of(args), has_subsets=args.dataset in ("cirr", "toy"))
    except ValueError as e:
        p.error(str(e))
    if args.oracle and not args.noise and args.dataset != "toy":
        p.error("--oracle trains on the triplets known to be clean, and without injected noise (--noise > 0) "
                f"nothing about {args.dataset}'s triplets is known; add --noise")
    return args


def noise_of(args):
    return data.Noise(args.noise, args.noise_kind, args.seed)


# -----------------------------------------------------------------------------
# one step

def batch_loss(model, batch, w, tau, div_weight, bank=None, soft="weight"):
    """Loss of one batch and the per-sample InfoNCE losses that the NFB fits its GMM to.
    batch: (tokens, ref, tgt, idx) where ref/tgt are images (B,3,H,W), cached image tokens (B,1+m,D), or, in
    stage 2, ref = cached reference features (B, D) and tgt = bank rows (B,). w (B,) soft labels or None."""
    tokens, ref, tgt, idx = batch
    if bank is not None:                                    # SPN stage 2: every training image is a negative
        q, _, pen = model(tokens, ref_feats=ref)
        t_all, pos = bank, tgt                                              # (N, D), (B,) bank rows
    else:
        kind = "images" if ref.dim() == 4 else "tokens"
        q, t, pen = model(tokens, **{f"ref_{kind}": ref, f"tgt_{kind}": tgt})
        t_all = gather_with_grad(t)                                         # (W·B, D)
        rank = dist.get_rank() if dist.is_initialized() else 0
        pos = torch.arange(len(q), device=q.device) + rank * len(q)         # my targets' rows in t_all
    if w is None:                                           # L_NCE, over the batch or over the bank
        loss_vec = info_nce(q, t_all, tau, pos=pos, reduction="none")                   # (B,)
        plain = loss_vec.detach()
    else:                                                   # L^soft_NCE, and l_i for --nfb-losses train
        loss_vec = soft_nce(q, t_all, w, tau, pos=pos, soft=soft, reduction="none")     # (B,)
        plain = info_nce(q.detach(), t_all.detach(), tau, pos=pos, reduction="none")
    return loss_vec.mean() + div_weight * pen, plain.detach().float()


# -----------------------------------------------------------------------------
# data, model, optimiser

def collate(batch, context_length=77):
    """(ref, text, tgt, i) items -> tokens (B, L), ref (B, ...), tgt (B, ...), idx (B,). Runs in the workers
    (images), or in the main process when the items are image indices into a cache."""
    ref, text, tgt, idx = zip(*batch)

    def stack(xs):                                  # images or tokens (tensors), or image indices (ints)
        return torch.stack(xs) if torch.is_tensor(xs[0]) else torch.tensor(xs)
    return tokenize(list(text), context_length, truncate=True), stack(ref), stack(tgt), torch.tensor(idx)


def make_dataset(args, split, view, transform, return_images=True):
    """The dataset of the run: CIRR (and the toy benchmark, which is written in CIRR's layout), FashionIQ or
    Shoes."""
    kw = dict(view=view, transform=transform, skip_missing=args.skip_missing)
    if split == "train" and view == "triplets":
        kw.update(noise=noise_of(args), return_images=return_images,
                  extra_triplets=args.extra_triplets)
    if args.dataset == "fashioniq":
        return data.FashionIQ(args.data_root, args.categories, split, **kw)
    if args.dataset == "shoes":
        return data.Shoes(args.data_root, split, **kw)
    return data.CIRR(args.data_root, split, **kw)


def make_loader(ds, args, epoch, rank, world, shuffle=True, keep=None):
    """A fresh loader per epoch whose order and worker seeds depend only on (seed, epoch): resumable exactly.
    keep (n,) bool: the epoch cycles over these triplets only (epoch_order)."""
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    sampler = None
    if shuffle and (keep is not None or args.group_batches):
        keep = torch.ones(len(ds), dtype=torch.bool) if keep is None else keep
        sampler = epoch_order(keep, g, rank, world, ds.ref_idx if args.group_batches else None)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=shuffle, seed=args.seed,
                                                      drop_last=shuffle)
        sampler.set_epoch(epoch)
    collate_fn = functools.partial(collate, context_length=args.context_length)
    # Items that are image indices (a cache holds the images) cost next to nothing: workers would only compete
    # with the compute threads for the cores.
    workers = args.workers if ds.return_images else 0
    return DataLoader(ds, batch_size=args.batch_size // world, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_fn, generator=g, drop_last=shuffle,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def epoch_order(keep, g, rank, world, groups=None):
    """An epoch over the kept triplets only, with as many samples as a full epoch (so the same number of optimizer
    steps): permutations of the kept set, concatenated, then this rank's share. keep (n,) bool: --oracle keeps the
    triplets known to be clean (the ceiling of a noisy run); --soft-label sample keeps pair i with probability w_i."""
    kept = keep.nonzero().squeeze(1)                                     # (n_kept,)
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} training triplets kept (--oracle: clean ones); lower --noise")
    n = len(keep)
    reps = -(-n // len(kept))
    order = torch.cat([grouped(kept[torch.randperm(len(kept), generator=g)], groups, g) for _ in range(reps)])[:n]
    return order[rank::world][:n // world].tolist()


def grouped(idx, groups, g):
    """idx (k,) in random order -> the same indices with each group's members side by side, the groups in random
    order (--group-batches: a batch then holds whole groups, so a query meets its group's other targets)."""
    if groups is None:
        return idx
    gid = groups[idx]                                                    # (k,)
    uniq, inv = gid.unique(return_inverse=True)
    group_rank = torch.randperm(len(uniq), generator=g)[inv]            # (k,) a random rank per group
    return idx[torch.argsort(group_rank * len(idx) + torch.arange(len(idx)))]


def param_groups(model, args):
    """AdamW groups: CLIP at --lr, WCB heads at --lr-wcb; weight decay on matrices only (not norms, biases, α)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = args.lr if name.startswith("clip.") else args.lr_wcb
        wd = args.wd if p.dim() >= 2 else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [dict(params=ps, lr=lr, weight_decay=wd) for (lr, wd), ps in groups.items()]


def freeze(model, args):
    """--encoder text freezes the image tower, --encoder image the text side; stage 2 freezes the whole image
    side, WCB image heads included (SPN: the bank must not move)."""
    text_side = lambda n: not n.startswith(("clip.visual.", "wcb_ref.", "wcb_tar."))
    for n, p in model.named_parameters():
        if args.stage == 2:
            p.requires_grad = p.requires_grad and text_side(n)     # CLIP's unused logit_scale stays frozen
        elif args.encoder == "text" and n.startswith("clip.visual."):
            p.requires_grad = False
        elif args.encoder == "image" and n.startswith("clip.") and text_side(n):
            p.requires_grad = False


def lr_lambda(total, warm):
    """Linear warm-up over `warm` steps, then cosine decay to 0 at `total`."""
    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f


# -----------------------------------------------------------------------------
# the epoch

def to_device(batch, device, cache=None, bank=None):
    """A loader batch on the device. With a cache the loader gives image indices: their rows of the CPU-side cache
    (decoded uint8 images, image tokens of a frozen tower, or SPN's f_ref) are gathered first, so the cache never
    has to fit on the GPU; uint8 images are normalised on the device (4x less to copy)."""
    tokens, ref, tgt, idx = batch
    if bank is not None:                                # stage 2: ref = f_ref rows, tgt = bank row indices
        ref = cache[ref]
    elif cache is not None:                             # decoded images (uint8), or a frozen tower's fp16 tokens
        ref, tgt = cache[ref], cache[tgt]
    nb = device.type == "cuda"
    tokens, ref, tgt = (x.to(device, non_blocking=nb) for x in (tokens, ref, tgt))
    if cache is not None and bank is None:
        ref, tgt = (normalize_pixels(x) if x.dtype == torch.uint8 else x.float() for x in (ref, tgt))
    return tokens, ref, tgt, idx


def train_epoch(args, model, ddp, ds, opt, sched, scaler, amp, nfb, epoch, rank, world, device, cache=None, bank=None):
    """One pass over the training triplets. Returns the mean loss, the per-sample InfoNCE losses (n,) (NaN where
    a sample was not seen: drop_last) and the time spent in data loading, forward and backward."""
    model.train()
    if args.encoder == "text" or args.stage == 2:
        model.clip.visual.eval()                        # frozen tower: BatchNorm statistics stay put too
    use_w = nfb is not None and nfb.active(epoch)
    keep = None
    if args.oracle:
        keep = ~ds.noisy
    elif use_w and args.soft_label == "sample":     # the soft labels choose the epoch's pairs instead of weights
        keep = nfb.draw(torch.Generator().manual_seed(args.seed * 1000 + epoch))
        use_w = False
    loader = make_loader(ds, args, epoch, rank, world, keep=keep)
    losses = torch.full((len(ds),), float("nan"), device=device)
    total, steps, t_data, t_fwd, t_bwd = 0.0, 0, 0.0, 0.0, 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for batch in bar:
        tokens, ref, tgt, idx = to_device(batch, device, cache, bank)
        w = nfb.weights[idx].to(device) if use_w else None
        t1 = time.perf_counter()
        with amp:
            loss, plain = batch_loss(ddp, (tokens, ref, tgt, idx), w, args.tau, args.div_weight, bank,
                                     args.soft_label)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        losses[idx.to(device)] = plain
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"epoch {epoch}, step {steps}: the loss is {value}; the run diverged "
                                     f"(lower --lr, or try --amp none). last.pt still holds the previous epoch")
        total, steps = total + value, steps + 1
        t3 = time.perf_counter()
        t_data, t_fwd, t_bwd, t0 = t_data + t1 - t0, t_fwd + t2 - t1, t_bwd + t3 - t2, t3
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if args.max_steps and steps >= args.max_steps:
            break
    return total / max(1, steps), losses, dict(data=t_data, forward=t_fwd, backward=t_bwd)


@torch.no_grad()
def gallery_losses(args, model, ds, device, cache=None, bank=None):
    """--nfb-losses gallery: every training query ranked over every training image (reference excluded), no grad:
    l_i = -log softmax over the training gallery of the labelled target (loss.gallery_nce). The images' features
    come from SPN's bank (stage 2), from cached tokens (--encoder text) or from one pass over the gallery."""
    model.eval()
    if bank is not None:                                    # stage 2: f_ref cached, the bank is every f_tar
        f_ref, f_tar = cache, bank
    elif cache is not None and cache.dtype != torch.uint8:  # frozen tower: its tokens are cached
        tok = [cache[s:s + args.batch_size].to(device).float() for s in range(0, len(cache), args.batch_size)]
        f_ref = torch.cat([model.image_features(x, "ref")[0] for x in tok])
        f_tar = torch.cat([model.image_features(x, "tar")[0] for x in tok])
    else:
        f_ref, f_tar = evaluate.encode_gallery(model, ds.gallery, args.batch_size, device, args.workers)
    texts = [t["text"] for t in ds.triplets]
    q = evaluate.encode_queries(model, texts, f_ref[ds.ref_idx], args.batch_size, device)   # (n, D)
    return gallery_nce(q, F.normalize(f_tar.float(), dim=-1), ds.tgt_idx, args.tau, exclude=ds.ref_idx)


@torch.no_grad()
def eval_losses(args, ddp, ds, amp, rank, world, device, cache=None, bank=None):
    """--nfb-losses eval: per-sample InfoNCE losses of the current model, no grad, the training set in fixed
    chunks of one batch (the classic noisy-correspondence recipe; costs an extra forward pass per epoch)."""
    ddp.eval()
    losses = torch.full((len(ds),), float("nan"), device=device)
    for batch in make_loader(ds, args, 0, rank, world, shuffle=False):
        tokens, ref, tgt, idx = to_device(batch, device, cache, bank)
        with amp:
            _, plain = batch_loss(ddp, (tokens, ref, tgt, idx), None, args.tau, 0.0, bank)
        losses[idx.to(device)] = plain
    return losses


# -----------------------------------------------------------------------------
# run setup: images, model, resume

def cached_images(gallery, args, rank):
    """--cache-images: the gallery view's images decoded once (uint8, data.decode_images)."""
    t = time.perf_counter()
    pixels = data.decode_images(gallery, args.workers)
    log(f"decoded {gallery.split} images once: {tuple(pixels.shape)} uint8, {pixels.numel() / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t:.1f} s", rank)
    return pixels


def init_model(args, init):
    """A stage-1 checkpoint (--init, --resume: its architecture and image pipeline win, since SPN's bank must be
    the stage-1 model's features) or CLIP by name / path with fresh WCB heads."""
    if init is None:
        clip, _ = load_clip(args.clip, device="cpu")
        return CIRModel(clip, wcb=not args.no_wcb, n_maps=args.wcb_maps, wcb_hidden=args.wcb_hidden)
    if init["args"]["dataset"] != args.dataset:
        sys.exit(f"error: {args.init} was trained on {init['args']['dataset']}, not {args.dataset}; pass "
                 f"--dataset {init['args']['dataset']} or a {args.dataset} checkpoint")
    for k in ("clip", "no_wcb", "wcb_maps", "wcb_hidden", "transform", "categories"):
        setattr(args, k, init["args"][k])
    return evaluate.build_model(init)


def restore(resume, opt, sched, scaler, nfb, out, rank):
    """Everything of last.pt back in place; returns the next epoch, the best score and the log history."""
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    if scaler is not None and resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    if nfb is not None:
        nfb.load_state_dict(resume["nfb"])
    set_rng_state(resume["rng"])
    if rank == 0:   # the log as of the checkpoint: an epoch logged after it will be trained (and logged) again
        (out / "log.jsonl").write_text("".join(json.dumps(strict_json(r)) + "\n" for r in resume["history"]))
    log(f"resumed {out} after epoch {resume['epoch']}", rank)
    return resume["epoch"] + 1, resume["best"], resume["history"]


# -----------------------------------------------------------------------------
# after each epoch: the NFB's refit, the checkpoints

def refit_noise_filter(args, nfb, losses, epoch, ddp, ds, amp, rank, world, device, cache, bank, out):
    """NFB: the epoch's per-sample losses (of all ranks) -> a GMM -> the next epoch's soft labels, the same on
    every rank. Returns the log fields (nfb_*) and draws the loss histogram."""
    t = time.perf_counter()
    if args.nfb_losses == "eval":
        losses = eval_losses(args, ddp, ds, amp, rank, world, device, cache, bank)
    elif args.nfb_losses == "gallery":
        losses = gallery_losses(args, ddp.module if world > 1 else ddp, ds, device, cache, bank)
    losses = merge_losses(losses)
    stats = nfb.update(losses.cpu(), epoch)
    if world > 1:                                   # one GMM, the same soft labels on every rank
        w = nfb.weights.to(device)
        dist.broadcast(w, 0)
        nfb.weights = w.cpu()
    if rank == 0 and args.plots:
        plots.loss_histogram(losses.cpu(), stats, out / f"loss_hist_epoch{epoch:03d}.png", epoch,
                             noisy=ds.noisy if ds.noisy.any() else None)
    return dict(time_nfb=time.perf_counter() - t, **{f"nfb_{k}": v for k, v in stats.items()})


def save_epoch(out, rec, history, best, model, opt, sched, scaler, nfb, args):
    """best.pt (on a new best), then last.pt, then the log line: a kill between two writes never leaves a log or
    a last.pt that claims more than the files before it hold. Returns the best score so far."""
    epoch, metrics = rec["epoch"], rec["metrics"]
    if rec["score"] > best:
        atomic_save(dict(model=model.state_dict(), args=vars(args), epoch=epoch, metrics=metrics,
                         nfb=nfb.state_dict() if nfb else None), out / "best.pt")
        best = rec["score"]
    atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     scaler=scaler.state_dict() if scaler else None, nfb=nfb.state_dict() if nfb else None,
                     epoch=epoch, best=best, history=history, args=vars(args), rng=rng_state()), out / "last.pt")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(strict_json(rec)) + "\n")
    return best


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed()
    resume = None
    if args.resume:
        path = Path(args.resume) / "last.pt" if Path(args.resume).is_dir() else Path(args.resume)
        resume = evaluate.load_checkpoint(path, "--resume")
        given = {k: getattr(args, k) for k in ("amp", "workers") if getattr(args, k) is not None}
        base = vars(get_args(["--dataset", resume["args"]["dataset"]]))     # flags newer than the run: defaults
        args = argparse.Namespace(**{**base, **resume["args"], **given, "resume": args.resume,
                                     "out": str(path.parent)})
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.dataset == "toy":                   # generated once, by rank 0, while the others wait
        if rank == 0:
            args.data_root = str(toy.toy_root(args.data_root))
        if world > 1:
            dist.barrier()
        args.data_root = str(toy.toy_root(args.data_root))
    elif not args.data_root:
        sys.exit(f"error: --dataset {args.dataset} needs --data-root DIR (the dataset folder in its official layout, "
                 f"README: Data)")
    out = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(out)

    init = resume or (evaluate.load_checkpoint(args.init, "--init") if args.init else None)
    model = init_model(args, init).to(device)
    freeze(model, args)
    transform = make_transform(args.transform, model.clip.image_resolution)
    args.context_length = model.clip.context_length
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))

    frozen_images = args.encoder == "text" or args.stage == 2
    ds = make_dataset(args, "train", "triplets", transform, return_images=not (frozen_images or args.cache_images))
    pixels = make_transform(args.transform, model.clip.image_resolution, pixels=True) if args.cache_images else None
    ds.gallery = make_dataset(args, "train", "gallery", pixels or transform)     # every training image, once
    if args.cache_images:
        ds.gallery.pixels = cached_images(ds.gallery, args, rank)
    cache, bank = getattr(ds.gallery, "pixels", None), None
    if frozen_images:
        cache, bank = spn.frozen_image_side(model, ds.gallery, ds, args, device, out, resume, rank)
    val_split = evaluate.EVAL_SPLIT[args.dataset]               # Shoes has no val: its papers validate on test
    eval_sets = evaluate.eval_sets(args.dataset, args.data_root, val_split, pixels or transform, args.categories,
                                   args.skip_missing)
    if args.cache_images:
        for _, gallery, _ in eval_sets:
            gallery.pixels = cached_images(gallery, args, rank)
    log(f"train: {len(ds)} triplets over {len(ds.images)} images, {int(ds.noisy.sum())} noisy", rank)

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    opt = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(ds) // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = max(1, steps_per_epoch * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(args.lr_warmup * total)))
    amp, scaler = evaluate.autocast(args.amp, device)
    nfb = None if args.no_nfb else NoiseFilter(len(ds), args.warmup_epochs, args.gmm,
                                               noisy_gt=ds.noise_field if ds.noisy.any() else None, gate=args.nfb_gate)
    if args.stage == 2 and nfb is not None and resume is None:
        spn.carry_over_soft_labels(nfb, init, ds, args, rank)
    start, best, history = 0, -1.0, []
    if resume is not None:
        start, best, history = restore(resume, opt, sched, scaler, nfb, out, rank)

    for epoch in range(start, args.epochs):
        t_epoch = time.perf_counter()
        loss, losses, times = train_epoch(args, model, ddp, ds, opt, sched, scaler, amp, nfb, epoch, rank, world,
                                          device, cache, bank)
        rec = dict(epoch=epoch, loss=loss, lr=sched.get_last_lr()[0], **{f"time_{k}": v for k, v in times.items()})
        if nfb is not None:
            rec.update(refit_noise_filter(args, nfb, losses, epoch, ddp, ds, amp, rank, world, device, cache, bank,
                                          out))
        if rank == 0:
            metrics = evaluate.evaluate_sets(model, eval_sets, args.dataset, args.batch_size, device, args.workers, amp)
            # metrics["avg"] picks the best checkpoint: CIRR (R@5 + Rsubset@1)/2, FashionIQ (R@10 + R@50)/2,
            # Shoes (R@1 + R@10 + R@50)/3
            rec.update(metrics=metrics, score=metrics["avg"], time_epoch=time.perf_counter() - t_epoch)
            history.append(rec)
            if args.plots:
                plots.recall_curves(history, out / "recall.png")
            best = save_epoch(out, rec, history, best, model, opt, sched, scaler, nfb, args)
            log(f"epoch {epoch}: loss {loss:.4f} | " + evaluate.format_metrics(metrics)
                + (f" | NFB noisy {rec['nfb_n_noisy']}" if nfb is not None else "")
                + (f" AUC {rec['nfb_auc']:.3f}" if rec.get("nfb_auc") is not None else "")
                + f" | {rec['time_epoch']:.0f} s")
        if world > 1:
            dist.barrier()
    if rank == 0 and history:
        b = max(history, key=lambda r: r["score"])
        log(f"\ndone. best epoch {b['epoch']}: " + evaluate.format_metrics(b["metrics"]))
        log(f"checkpoint {out / 'best.pt'}, log {out / 'log.jsonl'}, plots {out}/*.png")
    if world > 1:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, FloatingPointError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {error_line(e)}")
