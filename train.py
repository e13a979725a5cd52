"""Training: NCL-CIR (WCB + NFB + soft-label NCE) and SPN's stage 2, on one CPU, one GPU or many (torchrun).

    python train.py                                    # toy benchmark, tiny CLIP from scratch, CPU, minutes
    python train.py --dataset cirr --data-root DIR     # CIRR, pretrained CLIP (default RN50x4)
    python train.py --dataset fashioniq --data-root DIR --categories dress shirt toptee
    python train.py --dataset shoes --data-root DIR    # Shoes: validation on its test split (it has no val)
    torchrun --nproc_per_node 4 train.py --dataset cirr --data-root DIR
    python train.py --stage 2 --init runs/X/best.pt    # SPN stage 2 (spn.py): static bank of all training targets
    python train.py --resume runs/X                    # continue a killed run where its last epoch ended

One epoch (README: "What follows the paper"):
  1. the NFB's soft labels w (1 during the warm-up) choose the epoch's pairs (--soft-label sample: pair i is drawn
     with probability w_i) or weight them (weight, spread);
  2. every step (train_step): q = normalize(f_txt + f_ref), t = normalize(f_tar); loss = L^soft_NCE(q, t, w)
     + λ·diversity (loss.py);
  3. NFB (refit_noise_filter): every training query ranked over every training image -> per-pair losses -> a
     2-component GMM, gated by a test for a noise-like second mode -> the next epoch's w;
  4. validate (sharded over the processes), log one JSON line, plot, save last.pt atomically (best.pt on a new
     best).
"""

import argparse
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import evaluate
import runtime
import spn
import toy
from loss import SOFT_FORMS, info_nce, soft_nce
from model import TINY_CONFIGS, CIRModel, available_models, load_clip, make_transform, normalize_pixels, tokenize
from nfb import VIEWS, NoiseFilter, pair_views
from runtime import atomic_save, gather_with_grad, log, merge_losses, rng_state, set_rng_state, strict_json

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


# -----------------------------------------------------------------------------
# settings: defaults, dataset presets, stage 2 and resume, resolved and checked in one place

def parser():
    p = runtime.ArgumentParser(__doc__)
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
    p.add_argument("--nfb-losses", default="gallery", choices=["gallery", "train"],
                   help="per-pair losses for the GMM: every query over every training image after the epoch "
                   "(gallery), or the in-batch losses recorded in the training pass (train)")
    p.add_argument("--nfb-gate", type=float, default=0.02,
                   help="nats per pair by which two Gaussians must beat one Gamma on the losses, else every w = 1 "
                   "(no second mode: no noise; 0: never gate)")
    p.add_argument("--nfb-width", type=float, default=1.25,
                   help="the GMM's noisy component must be this many times wider (std) than its clean one, else "
                   "every w = 1: noise adds a wide mode, a clean distribution's second hump is as narrow as its "
                   "first (0: no test)")
    p.add_argument("--nfb-views", nargs="+", default=["query", "text"], choices=VIEWS,
                   help="the views of each training pair the NFB decides on, query first (it says whether there is "
                   "noise at all); a pair is flagged when any view flags it (nfb.pair_views)")
    p.add_argument("--nfb-gate-by", default="first", choices=["first", "each"],
                   help="first: the query view's gate says whether there is noise, then each view joins whose noisy "
                   "component is the wider; each: every view passes both tests on its own")
    p.add_argument("--nfb-text-temp", type=float, default=0.25,
                   help="the text view's temperature, a fraction of --tau: many texts describe one edit equally "
                   "well, a sharp softmax asks whether the pair's own text is among the best")
    p.add_argument("--nfb-text-inverted", action=argparse.BooleanOptionalAction, default=True,
                   help="the text view normalises each text's scores over the pairs before the texts compete (the "
                   "inverted softmax: a text that scores high on every pair does not win everywhere)")
    p.add_argument("--nfb-measure", action="store_true", help="log every view's detection (diagnosis)")
    # SPN
    p.add_argument("--stage", type=int, default=1, choices=[1, 2], help="2: SPN static-bank stage")
    p.add_argument("--init", default=None, help="checkpoint to start from (required by --stage 2)")
    p.add_argument("--extra-triplets", default=None, help="generated positives (spn.py) added to training")
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<time>)")
    p.add_argument("--resume", default=None, help="run folder or last.pt to continue")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (debug)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="recall curves and the NFB's loss histograms as PNGs in the run folder")
    return p


def settings(argv=None):
    """Every setting of the run, resolved and checked before any data or model is touched. The command line wins;
    then, for --resume, the run's own settings (its args.json; --amp / --workers may be given again); then stage 2's
    and the dataset's presets; flags newer than a resumed run take their defaults."""
    p = parser()
    args = p.parse_args(argv)
    if args.resume:
        path = Path(args.resume) / "last.pt" if Path(args.resume).is_dir() else Path(args.resume)
        if not path.is_file():
            p.error(f"--resume {args.resume}: no {path}; pass a run folder holding last.pt (or the file itself)")
        saved = json.loads((path.parent / "args.json").read_text()) if (path.parent / "args.json").is_file() \
            else runtime.load_checkpoint(path, "--resume")["args"]
        given = {k: getattr(args, k) for k in RUN if getattr(args, k) is not None}
        base = vars(defaults(saved["dataset"]))          # flags newer than the run take their defaults
        args = argparse.Namespace(**{**base, **saved, **given, "resume": str(path), "out": str(path.parent)})
    check(resolve(args), p)                           # a resumed run's settings, with what was given again, too
    return args


def defaults(dataset):
    """train.py's settings for a dataset with nothing given (the dataset's presets), unchecked."""
    return resolve(parser().parse_args(["--dataset", dataset]))


def resolve(args):
    """Fill what the command line left open from stage 2's and the dataset's presets."""
    presets = dict(DEFAULTS[args.dataset], **RUN, **(STAGE2[args.dataset] if args.stage == 2 else {}))
    for k, v in presets.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def check(args, p):
    """The rules a run's settings must meet; each failure is one line naming the flag and the fix."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rules = [
        (args.epochs >= 1, f"--epochs {args.epochs}: train at least 1 epoch"),
        (args.batch_size >= 2, f"--batch-size {args.batch_size}: contrastive training needs at least 2 pairs"),
        (args.batch_size % world == 0, f"--batch-size {args.batch_size} must be divisible by the {world} "
                                       "processes"),
        (args.tau > 0, f"--tau {args.tau}: the temperature of q·t/τ must be > 0 (0.01 for CLIP, 0.05 on the toy)"),
        (args.lr >= 0 and args.lr_wcb >= 0, "--lr / --lr-wcb: learning rates must be >= 0"),
        (0 <= args.lr_warmup < 1, f"--lr-warmup {args.lr_warmup}: a fraction of the steps, in [0, 1)"),
        (args.warmup_epochs >= 0, f"--warmup-epochs {args.warmup_epochs}: must be >= 0"),
        (args.nfb_gate >= 0, f"--nfb-gate {args.nfb_gate}: nats per pair, >= 0 (0: never gate)"),
        (args.nfb_width >= 0, f"--nfb-width {args.nfb_width}: a ratio of standard deviations, >= 0 (0: no test)"),
        (args.nfb_views[0] == "query" and len(set(args.nfb_views)) == len(args.nfb_views),
         f"--nfb-views {' '.join(args.nfb_views)}: list each view once, query first (its loss says whether there is "
         "noise at all), e.g. --nfb-views query text"),
        (args.nfb_text_temp > 0, f"--nfb-text-temp {args.nfb_text_temp}: a fraction of --tau, > 0"),
        (args.wcb_maps >= 2, f"--wcb-maps {args.wcb_maps}: the WCB needs K >= 2 weight maps to be diverse"),
        (args.workers >= 0, f"--workers {args.workers}: must be >= 0"),
        (args.max_steps is None or args.max_steps >= 1, f"--max-steps {args.max_steps}: must be >= 1"),
        (args.stage == 1 or args.init, "--stage 2 needs --init RUN/best.pt (a stage-1 checkpoint)"),
        (not args.init or Path(args.init).is_file(), f"--init {args.init}: no such file; pass a run's best.pt"),
        (not args.extra_triplets or Path(args.extra_triplets).is_file(),
         f"--extra-triplets {args.extra_triplets}: no such file; write one with `python spn.py`"),
        (args.dataset == "toy" or args.data_root, f"--dataset {args.dataset} needs --data-root DIR (the dataset "
                                                  "folder in its official layout, README: Data)"),
        (args.dataset == "toy" or not args.data_root or Path(args.data_root).expanduser().is_dir(),
         f"--data-root {args.data_root}: no such folder; point it at the {args.dataset} dataset folder"),
        (not args.oracle or args.noise or args.dataset == "toy",
         f"--oracle trains on the triplets known to be clean, and without injected noise (--noise > 0) nothing "
         f"about {args.dataset}'s triplets is known; add --noise"),
        (args.init or args.clip in TINY_CONFIGS or args.clip in available_models() or Path(args.clip).is_file(),
         f"--clip {args.clip}: not a released model ({', '.join(available_models())}) nor a file"),
    ]
    for ok, message in rules:
        if not ok:
            p.error(message)
    try:
        data.check_noise(noise_of(args), has_subsets=args.dataset in ("cirr", "toy"))
    except ValueError as e:
        p.error(str(e))


def noise_of(args):
    return data.Noise(args.noise, args.noise_kind, args.seed)


# -----------------------------------------------------------------------------
# the run's state

@dataclass
class Run:
    """Everything a training run holds, built by `build` and read by the steps below."""
    args: argparse.Namespace                 # the settings (settings())
    model: CIRModel                          # the model; `net` is what the step calls (DDP's wrapper, or model)
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler             # fp16 on a GPU only; disabled otherwise
    amp: object                              # the autocast context
    nfb: NoiseFilter | None                  # the noise filter (None: --no-nfb)
    train: data._CIRDataset                  # the training triplets; .gallery: every training image once
    cache: torch.Tensor | None               # what the loader's image indices point at (pixels, tokens, f_ref)
    bank: torch.Tensor | None                # SPN stage 2: every training image's target feature
    val: list                                # evaluate.eval_sets(...)
    enc: evaluate.Encoder                    # how features are computed (sharded under torchrun)
    out: Path
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    start: int = 0                           # the first epoch to train (resume)
    best: float = -1.0
    history: list = field(default_factory=list)


def build(args):
    """The run's state from its settings. The order is the order of the random streams: the same seed gives the
    same model, data order and soft labels, run after run and after a resume."""
    rank, world, device = runtime.setup_distributed()
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(args.seed)
    if args.dataset == "toy":                   # generated once, by rank 0, while the others wait
        if rank == 0:
            args.data_root = str(toy.toy_root(args.data_root))
        if world > 1:
            dist.barrier()
        args.data_root = str(toy.toy_root(args.data_root))
    out = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(out)
    resume = runtime.load_checkpoint(args.resume, "--resume") if args.resume else None
    init = resume or (runtime.load_checkpoint(args.init, "--init") if args.init else None)
    model = init_model(args, init).to(device)
    freeze(model, args)
    args.context_length = model.clip.context_length
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        log("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    amp, scaler = runtime.autocast(args.amp, device)
    enc = evaluate.Encoder(model, args.batch_size, device, args.workers, amp, rank, world)
    train, cache, bank, val = training_data(args, enc, out, resume)
    if "subset" in args.nfb_views and data.subset_rows(train) is None:     # FashionIQ, Shoes: no subsets
        args.nfb_views = [v for v in args.nfb_views if v != "subset"]
        log(f"NFB: {args.dataset} has no subsets (CIRR's img_set): the subset view is left out", rank)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.98), eps=1e-6)
    steps = min(len(train) // args.batch_size, args.max_steps or math.inf)
    total = max(1, steps * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(args.lr_warmup * total)))
    nfb = None if args.no_nfb else NoiseFilter(len(train), args.warmup_epochs, args.gmm, gate=args.nfb_gate,
                                               width=args.nfb_width, views=args.nfb_views, gate_by=args.nfb_gate_by,
                                               noisy_gt=train.noise_field if train.noisy.any() else None)
    run = Run(args, model, net, opt, sched, scaler, amp, nfb, train, cache, bank, val, enc, out, rank, world,
              device)
    if resume is not None:
        restore(run, resume)
    elif args.stage == 2 and nfb is not None:
        carry_over(run, init)
    return run


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
    return runtime.build_model(init)


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


def training_data(args, enc, out, resume):
    """The training triplets (with .gallery, every training image once), the cache the loader's image indices point
    at, SPN's bank, and the validation sets. With --cache-images every image is decoded once; with a frozen image
    side (--encoder text, stage 2) its tokens or features are computed once (spn.frozen_image_side)."""
    res, rank = enc.model.clip.image_resolution, enc.rank
    transform = make_transform(args.transform, res)
    pixels = make_transform(args.transform, res, pixels=True) if args.cache_images else None
    frozen_images = args.encoder == "text" or args.stage == 2
    train = data.dataset(args, "train", "triplets", transform, return_images=not (frozen_images or args.cache_images))
    train.gallery = data.dataset(args, "train", "gallery", pixels or transform)
    if args.cache_images:
        train.gallery.pixels = cached_images(train.gallery, args, rank)
    cache, bank = getattr(train.gallery, "pixels", None), None
    if frozen_images:
        cache, bank = spn.frozen_image_side(enc, train, args, out / "bank.pt", resume is not None)
    val = evaluate.eval_sets(args, evaluate.EVAL_SPLIT[args.dataset], pixels or transform)
    if args.cache_images:
        for _, gallery, _ in val:
            gallery.pixels = cached_images(gallery, args, rank)
    log(f"train: {len(train)} triplets over {len(train.images)} images, {int(train.noisy.sum())} noisy", rank)
    return train, cache, bank, val


def cached_images(gallery, args, rank):
    """--cache-images: the gallery view's images decoded once (uint8, data.decode_images)."""
    t = time.perf_counter()
    pixels = data.decode_images(gallery, args.workers)
    log(f"decoded {gallery.split} images once: {tuple(pixels.shape)} uint8, {pixels.numel() / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t:.1f} s", rank)
    return pixels


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


def lr_lambda(total, warm):
    """Linear warm-up over `warm` steps, then cosine decay to 0 at `total`."""
    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f


def restore(run, resume):
    """Everything of last.pt back in place: optimiser, schedule, scaler, soft labels, random streams, log."""
    run.opt.load_state_dict(resume["optimizer"])
    run.sched.load_state_dict(resume["scheduler"])
    if resume.get("scaler"):
        run.scaler.load_state_dict(resume["scaler"])
    if run.nfb is not None:
        run.nfb.load_state_dict(resume["nfb"])
    set_rng_state(resume["rng"])
    if run.rank == 0:   # the log as of the checkpoint: an epoch logged after it will be trained (and logged) again
        (run.out / "log.jsonl").write_text("".join(json.dumps(strict_json(r)) + "\n" for r in resume["history"]))
    log(f"resumed {run.out} after epoch {resume['epoch']}", run.rank)
    run.start, run.best, run.history = resume["epoch"] + 1, resume["best"], resume["history"]


def carry_over(run, init):
    """SPN stage 2 starts from stage 1's soft labels (README: "SPN") when they describe the same training triplets;
    otherwise the NFB warms up again."""
    a = run.args
    same = [k for k in ("noise", "noise_kind", "seed", "skip_missing", "extra_triplets")
            if init["args"].get(k, "target" if k == "noise_kind" else None) != getattr(a, k)]
    if init.get("nfb") and not same and len(init["nfb"]["weights"]) == len(run.train):
        run.nfb.carry_over(init["nfb"])
        log(f"NFB: soft labels of {a.init} carried over ({int((run.nfb.weights < 0.5).sum())} pairs flagged)",
            run.rank)
    else:
        why = "it has no NFB" if not init.get("nfb") else f"its triplets differ ({', '.join(same) or 'count'})"
        log(f"NFB: stage-1 soft labels not carried over: {why}; warm-up of {a.warmup_epochs} epoch(s)", run.rank)


# -----------------------------------------------------------------------------
# one step: batch -> features -> logits -> loss

def train_step(run, batch, w):
    """One optimizer step on a batch (tokens (B, L), ref, tgt, idx (B,)) with soft labels w (B,) or None. ref/tgt:
    images (B, 3, H, W), cached image tokens (B, 1+m, D), or in stage 2 f_ref (B, D) and bank rows (B,).
    Returns the loss and the per-pair l_i (B,) the NFB can fit its GMM to (--nfb-losses train)."""
    a, (tokens, ref, tgt, _) = run.args, batch
    with run.amp:
        if run.bank is not None:                         # SPN stage 2: every training image is a negative
            q, _, pen = run.net(tokens, ref_feats=ref)                          # (B, D)
            t_all, pos = run.bank, tgt                                          # (N, D), (B,) bank rows
        else:                                            # q = normalize(f_txt + f_ref), t = normalize(f_tar)
            kind = "images" if ref.dim() == 4 else "tokens"
            q, t, pen = run.net(tokens, **{f"ref_{kind}": ref, f"tgt_{kind}": tgt})
            t_all = gather_with_grad(t)                                         # (W·B, D) the global batch
            pos = torch.arange(len(q), device=q.device) + run.rank * len(q)     # my targets' rows in t_all
        if w is None:                                    # L_NCE: logits q t_all / τ
            l_i = info_nce(q, t_all, a.tau, pos=pos, reduction="none")                     # (B,)
        else:                                            # L^soft_NCE with the NFB's labels
            l_i = soft_nce(q, t_all, w, a.tau, pos=pos, soft=a.soft_label, reduction="none")
        loss = l_i.mean() + a.div_weight * pen
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.opt)
    torch.nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]], a.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    plain = l_i if w is None else info_nce(q, t_all, a.tau, pos=pos, reduction="none")
    return loss.item(), plain.detach().float()


# -----------------------------------------------------------------------------
# the epoch

def train_epoch(run, epoch):
    """One pass: the epoch's pairs and soft labels, then train_step on every batch. Returns the log fields and the
    per-pair losses (n,) of the training pass (NaN where a pair was not seen)."""
    a = run.args
    run.model.train()
    if a.encoder == "text" or a.stage == 2:
        run.model.clip.visual.eval()                    # frozen tower: BatchNorm statistics stay put too
    keep, w_all = epoch_labels(run, epoch)
    losses = torch.full((len(run.train),), float("nan"), device=run.device)
    total, steps, t_data, t_step = 0.0, 0, 0.0, 0.0
    loader = make_loader(run, epoch, keep=keep)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=run.rank != 0, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for batch in bar:
        batch = to_device(batch, run)
        idx = batch[3]
        t1 = time.perf_counter()
        value, plain = train_step(run, batch, None if w_all is None else w_all[idx].to(run.device))
        losses[idx.to(run.device)] = plain
        if not math.isfinite(value):
            raise FloatingPointError(f"epoch {epoch}, step {steps}: the loss is {value}; the run diverged "
                                     f"(lower --lr, or try --amp none). last.pt still holds the previous epoch")
        total, steps = total + value, steps + 1
        t2 = time.perf_counter()
        t_data, t_step, t0 = t_data + t1 - t0, t_step + t2 - t1, t2
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
        if a.max_steps and steps >= a.max_steps:
            break
    rec = dict(epoch=epoch, loss=total / max(1, steps), lr=run.sched.get_last_lr()[0], time_data=t_data,
               time_step=t_step)
    return rec, losses


def epoch_labels(run, epoch):
    """Which pairs the epoch trains on and with what labels: (keep (n,) bool or None, w (n,) or None).
    --oracle keeps the clean triplets; past the warm-up the NFB's w draws the epoch's pairs (--soft-label
    sample: pair i kept with probability w_i) or weights them (weight, spread)."""
    a, nfb = run.args, run.nfb
    if a.oracle:
        return ~run.train.noisy, None
    if nfb is None or not nfb.active(epoch):
        return None, None
    if a.soft_label == "sample":
        return nfb.draw(torch.Generator().manual_seed(a.seed * 1000 + epoch)), None
    return None, nfb.weights


def collate(batch, context_length=77):
    """(ref, text, tgt, i) items -> tokens (B, L), ref (B, ...), tgt (B, ...), idx (B,). Runs in the workers
    (images), or in the main process when the items are image indices into a cache."""
    ref, text, tgt, idx = zip(*batch)

    def stack(xs):                                  # images or tokens (tensors), or image indices (ints)
        return torch.stack(xs) if torch.is_tensor(xs[0]) else torch.tensor(xs)
    return tokenize(list(text), context_length, truncate=True), stack(ref), stack(tgt), torch.tensor(idx)


def make_loader(run, epoch, keep=None):
    """A fresh loader per epoch whose order and worker seeds depend only on (seed, epoch): resumable exactly.
    keep (n,) bool: the epoch cycles over these triplets only (epoch_order)."""
    a, ds, world = run.args, run.train, run.world
    g = torch.Generator().manual_seed(a.seed * 1000 + epoch)
    sampler = None
    if keep is not None or a.group_batches:
        keep = torch.ones(len(ds), dtype=torch.bool) if keep is None else keep
        sampler = epoch_order(keep, g, (run.rank, world), ds.ref_idx if a.group_batches else None)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(ds, world, run.rank, shuffle=True, seed=a.seed, drop_last=True)
        sampler.set_epoch(epoch)
    # Items that are image indices (a cache holds the images) cost next to nothing: workers would only compete
    # with the compute threads for the cores.
    return DataLoader(ds, batch_size=a.batch_size // world, shuffle=sampler is None, sampler=sampler,
                      num_workers=a.workers if ds.return_images else 0, generator=g, drop_last=True,
                      collate_fn=functools.partial(collate, context_length=a.context_length),
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def epoch_order(keep, g, shard=(0, 1), groups=None):
    """An epoch over the kept triplets only, with as many samples as a full epoch (so the same number of optimizer
    steps): permutations of the kept set, concatenated, then this rank's share (shard = (rank, world)).
    keep (n,) bool: --oracle keeps the triplets known to be clean (the ceiling of a noisy run); --soft-label
    sample keeps pair i with probability w_i. groups (n,): --group-batches puts each group's members together."""
    kept = keep.nonzero().squeeze(1)                                     # (n_kept,)
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} training triplets kept (--oracle: clean ones); lower --noise")
    n, (rank, world) = len(keep), shard
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


def to_device(batch, run):
    """A loader batch on the device. With a cache the loader gives image indices: their rows of the CPU-side cache
    (decoded uint8 images, image tokens of a frozen tower, or SPN's f_ref) are gathered first, so the cache never
    has to fit on the GPU; uint8 images are normalised on the device (4x less to copy)."""
    tokens, ref, tgt, idx = batch
    cache, bank, device = run.cache, run.bank, run.device
    if bank is not None:                                # stage 2: ref = f_ref rows, tgt = bank row indices
        ref = cache[ref]
    elif cache is not None:                             # decoded images (uint8), or a frozen tower's fp16 tokens
        ref, tgt = cache[ref], cache[tgt]
    nb = device.type == "cuda"
    tokens, ref, tgt = (x.to(device, non_blocking=nb) for x in (tokens, ref, tgt))
    if cache is not None and bank is None:
        ref, tgt = (normalize_pixels(x) if x.dtype == torch.uint8 else x.float() for x in (ref, tgt))
    return tokens, ref, tgt, idx


# -----------------------------------------------------------------------------
# after each epoch: the NFB's refit, validation, the checkpoints

def refit_noise_filter(run, losses, epoch):
    """NFB: per-pair losses (of all ranks) -> a GMM -> the next epoch's soft labels, the same on every rank.
    Returns the log fields (nfb_*) and draws the loss histogram."""
    t = time.perf_counter()
    views = {}
    if run.args.nfb_losses == "gallery" or len(run.args.nfb_views) > 1 or run.args.nfb_measure:
        views = noise_views(run)
    if run.args.nfb_losses == "train":                 # the query view from the training pass's own losses
        views["query"] = merge_losses(losses)
    views = {k: v.cpu() for k, v in views.items()}
    losses = views["query"]
    stats = run.nfb.update(views, epoch)
    if run.world > 1:                                   # one GMM, the same soft labels on every rank
        w = run.nfb.weights.to(run.device)
        dist.broadcast(w, 0)
        run.nfb.weights = w.cpu()
    if run.rank == 0 and run.args.plots:
        runtime.loss_histogram(losses.cpu(), stats, run.out / f"loss_hist_epoch{epoch:03d}.png", epoch,
                               noisy=run.train.noisy if run.train.noisy.any() else None)
    return dict(time_nfb=time.perf_counter() - t, **{f"nfb_{k}": v for k, v in stats.items()})


@torch.no_grad()
def noise_views(run):
    """The NFB's views of every training pair after the epoch, no grad (nfb.pair_views): {name: (n,) losses} for
    the views of --nfb-views (with --nfb-measure every view, for the log). The images' features come from SPN's
    bank (stage 2), from cached tokens (--encoder text) or from one pass over the gallery; the distinct texts are
    encoded once; each process encodes its share."""
    a, ds, enc, cache = run.args, run.train, run.enc, run.cache
    if run.bank is not None:                            # stage 2: f_ref cached, the bank is every f_tar
        f_ref, f_tar = cache, run.bank
    elif cache is not None and cache.dtype != torch.uint8:  # frozen tower: its tokens are cached
        tok = [cache[s:s + a.batch_size].to(run.device).float() for s in range(0, len(cache), a.batch_size)]
        f_ref = torch.cat([run.model.image_features(x, "ref")[0] for x in tok])
        f_tar = torch.cat([run.model.image_features(x, "tar")[0] for x in tok])
    else:
        f_ref, f_tar = evaluate.encode_gallery(enc, ds.gallery)                 # (N, D) each
    pf = evaluate.pair_features(enc, ds, f_ref, f_tar)
    names = VIEWS if a.nfb_measure else a.nfb_views
    if pf.subsets is None and "subset" in names:
        names = [v for v in names if v != "subset"]
        data.say(f"NFB: {a.dataset} has no subsets (CIRR's img_set): the subset view is left out")
    return pair_views(pf, names, a.tau, a.nfb_text_temp, a.nfb_text_inverted)


def save_epoch(run, rec):
    """best.pt (on a new best), then last.pt, then the log line: a kill between two writes never leaves a log or
    a last.pt that claims more than the files before it hold."""
    a, nfb = run.args, run.nfb
    if rec["score"] > run.best:
        atomic_save(dict(model=run.model.state_dict(), args=vars(a), epoch=rec["epoch"], metrics=rec["metrics"],
                         nfb=nfb.state_dict() if nfb else None), run.out / "best.pt")
        run.best = rec["score"]
    atomic_save(dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
                     scaler=run.scaler.state_dict(), nfb=nfb.state_dict() if nfb else None, epoch=rec["epoch"],
                     best=run.best, history=run.history, args=vars(a), rng=rng_state()), run.out / "last.pt")
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps(strict_json(rec)) + "\n")


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    run = build(settings(argv))
    a = run.args
    for epoch in range(run.start, a.epochs):
        t = time.perf_counter()
        rec, losses = train_epoch(run, epoch)
        if run.nfb is not None:
            rec.update(refit_noise_filter(run, losses, epoch))
        # every process encodes its share of the validation images and queries; the metrics are the same on all
        metrics = evaluate.evaluate_sets(run.enc, run.val, a.dataset)
        # metrics["avg"] picks best.pt: CIRR (R@5 + Rsubset@1)/2, FashionIQ (R@10 + R@50)/2, Shoes mean R@1/10/50
        rec.update(metrics=metrics, score=metrics["avg"], time_epoch=time.perf_counter() - t)
        if run.rank == 0:
            run.history.append(rec)
            if a.plots:
                runtime.recall_curves(run.history, run.out / "recall.png")
            save_epoch(run, rec)
            log(f"epoch {epoch}: loss {rec['loss']:.4f} | " + evaluate.format_metrics(metrics)
                + (f" | NFB noisy {rec['nfb_n_noisy']}" if run.nfb is not None else "")
                + (f" AUC {rec['nfb_auc']:.3f}" if rec.get("nfb_auc") is not None else "")
                + f" | {rec['time_epoch']:.0f} s")
    if run.rank == 0 and run.history:
        b = max(run.history, key=lambda r: r["score"])
        log(f"\ndone. best epoch {b['epoch']}: " + evaluate.format_metrics(b["metrics"]))
        log(f"checkpoint {run.out / 'best.pt'}, log {run.out / 'log.jsonl'}, plots {run.out}/*.png")
    if run.world > 1:
        dist.destroy_process_group()
    return run.out


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, FloatingPointError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {runtime.error_line(e)}")
