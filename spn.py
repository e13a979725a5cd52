"""SPN's "more negatives" (Feng, Zhang, Nie, ACM MM 2024), stage 2 of training, and the frozen image side it rests on.

Stage 2 freezes the image side (tower and image WCB heads, train.freeze), computes once the normalised target
feature of every training image (the bank) and each image's reference feature f_ref, and trains the text side with
NCE over the whole bank (loss.bank_nce, or loss.soft_and_plain_nce over the bank with soft labels): every training
image is a negative of every query. The NFB's soft labels of stage 1 carry over when both stages see the same
triplets. --encoder text (stage 1 with a frozen image tower) uses the same machinery with cached image tokens.
SPN's "more positives" are in generate.py.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import evaluate
from runtime import atomic_save, log


@torch.no_grad()
def cache_image_tokens(model, gallery, args, device):
    """Image tokens (N, 1+m, D) of every training image, fp16, computed once: with the image tower frozen they
    never change, so each epoch costs only the text side and the (cheap) WCB heads."""
    return evaluate.encode_gallery(model, gallery, args.batch_size, device, args.workers, tokens=True).half().cpu()


def build_bank(model, gallery, args, device, path, reuse=False):
    """SPN stage 2: f_ref and the normalised target features b of every unique training image, once, cached to
    `path` and reused when the run resumes. Returns f_ref (N, D), bank (N, D)."""
    if reuse and path.exists():
        c = torch.load(path, map_location="cpu", weights_only=True)
        return c["ref"], c["bank"].to(device)
    f_ref, f_tar = evaluate.encode_gallery(model, gallery, args.batch_size, device, args.workers)
    bank = F.normalize(f_tar.float(), dim=-1)
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_save({"ref": f_ref.cpu(), "bank": bank.cpu()}, path)
    return f_ref.cpu(), bank.to(device)


def frozen_image_side(model, gallery, ds, args, device, out, resume, rank):
    """With a frozen image side the loader gives image indices, and these caches give their rows: image tokens of
    every training image (--encoder text), or SPN's f_ref and bank (--stage 2). gallery: the training split's
    gallery view (its image list is the triplets' one). Returns cache, bank."""
    if list(gallery.images) != list(ds.images):
        raise RuntimeError("train gallery and triplets disagree on the image list")
    t = time.perf_counter()
    if args.stage == 2:
        cache, bank = build_bank(model, gallery, args, device, out / "bank.pt", reuse=resume is not None)
        log(f"SPN bank: {len(bank)} training images x {bank.shape[1]} dims, "
            f"{bank.numel() * bank.element_size() / 2**20:.1f} MiB per process (every rank holds it all), "
            f"{time.perf_counter() - t:.1f} s", rank)
        return cache, bank
    cache = cache_image_tokens(model, gallery, args, device)
    log(f"cached image tokens {tuple(cache.shape)} fp16, {cache.numel() * 2 / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t:.1f} s", rank)
    return cache, None


def carry_over_soft_labels(nfb, init, ds, args, rank):
    """Stage 2 starts from stage 1's soft labels (README: "SPN") when they describe the same training triplets;
    otherwise the NFB warms up again."""
    same = [k for k in ("noise", "seed", "skip_missing", "extra_triplets") if init["args"][k] != getattr(args, k)]
    if init.get("nfb") and not same and len(init["nfb"]["weights"]) == len(ds):
        nfb.weights = init["nfb"]["weights"].float()
        nfb.warmup_epochs = 0
        log(f"NFB: soft labels of {args.init} carried over ({int((nfb.weights < 0.5).sum())} pairs flagged)", rank)
    else:
        why = "it has no NFB" if not init.get("nfb") else f"its triplets differ ({', '.join(same) or 'count'})"
        log(f"NFB: stage-1 soft labels not carried over: {why}; warm-up of {args.warmup_epochs} epoch(s)", rank)
