"""Training: NCL-CIR (WCB + NFB + soft-label NCE) and SPN's stage 2, on CPU, GPU or many (torchrun).

    python train.py                                 # the toy: tiny CLIP from scratch, CPU, minutes
    python train.py --dataset cirr --data-root DIR  # pretrained CLIP (RN50x4); or fashioniq, shoes
    torchrun --nproc_per_node 4 train.py --dataset cirr --data-root DIR
    python train.py --stage 2 --init runs/X/best.pt # SPN stage 2: a bank of all training targets
    python train.py --resume runs/X                 # continue a killed run after its last epoch

One epoch (README: "The paper and our choices"):
  1. the NFB's soft labels w (1 in the warm-up) draw the epoch's pairs (--soft-label sample: pair i
     with probability w_i) or weigh them (weight; complement: w_i of InfoNCE, 1 - w_i of what q
     is not);
  2. each step (train_step): q = normalize(f_txt + f_ref), t = normalize(f_tar),
     loss = L^soft_NCE(q, t, w) + λ·diversity (loss.py; SPN's stage 2: t is the bank, batch_loss;
     --micro-batch: the same gradients, the towers a micro-batch at a time, cached_backward);
  3. NFB (refit_noise_filter): each pair's views (its query's loss over all training images, which
     text explains its reference and target) -> a GMM per view, gated by a test for a noise-like
     second mode -> the next epoch's w;
  4. validate (sharded), log a JSON line, plot, save last.pt atomically (best.pt on a new best).
Settings (flags, presets, checks): runtime.py.
"""

import functools
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import evaluate
import plots
import runtime
import toy
from encode import Encoder, ImageSource, pair_features
from loss import info_nce, soft_nce
from model import CIRModel, load_clip, running_stats_kept, set_grad_checkpoint
from nfb import NoiseFilter, pair_views
from preprocess import make_transform, tokenize
from util import atomic_write, error_line, log, strict_json

# -----------------------------------------------------------------------------
# the run's state

@dataclass
class Run:
    """Everything a training run holds, built by `build` and read by the steps below."""
    args: object                 # the settings (runtime.settings)
    model: CIRModel
    net: torch.nn.Module         # what the step calls: DDP's wrapper, or the model
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 on a GPU only; disabled otherwise
    amp: object                  # the autocast context
    nfb: NoiseFilter | None      # None: --no-nfb
    train: data.TripletDataset
    images: ImageSource          # what the loader's indices become (files, pixels, tokens, bank)
    val: list                    # [(name, ImageSource, data.TripletDataset)]: evaluate.eval_sets
    enc: Encoder                 # how features are computed (sharded under torchrun)
    out: Path
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    start: int = 0               # the first epoch to train (resume)
    best: float = -1.0
    history: list = field(default_factory=list)

def build(args):
    """The run's state from its frozen settings, built in the order of the random streams: the same
    seed gives the same model, data order and soft labels, after a resume too."""
    rank, world, device = runtime.setup_distributed()
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(args.seed)
    make_root = data.DATASETS[args.dataset].make_root  # the toy: made by rank 0, the others wait
    if make_root and rank == 0:                        # None: the default folder, refreshed if old
        default = Path(args.data_root) == toy.default_toy_root().resolve()
        make_root(None if default else args.data_root)
    if make_root and world > 1:
        dist.barrier()
    train = data.dataset(args, "train")      # the annotations only: no image read, no model loaded
    if args.oracle and not train.noisy.any():
        sys.exit("error: --oracle trains on the triplets known to be clean, and no training "
                 "triplet is marked noisy (the triplet format's 'noisy' key) nor corrupted "
                 "(--noise); add --noise")
    if args.oracle:
        log(f"--oracle: training on the {int((~train.noisy).sum())} triplets known to be clean "
            f"only ({int(train.noisy.sum())} noisy left out), as many steps as on all {len(train)}")
    if len(train) < args.batch_size:
        sys.exit(f"error: --batch-size {args.batch_size} is larger than the {len(train)} training "
                 f"triplets: an epoch would have no step; pass --batch-size "
                 f"{max(2, len(train) // 2)} or less")
    out = Path(args.out)
    resume = runtime.load_checkpoint(args.resume, "--resume") if args.resume else None
    init = resume or (runtime.load_checkpoint(args.init, "--init") if args.init else None)
    model = init_model(args, init).to(device)
    freeze(model, args)
    set_grad_checkpoint(model, args.grad_checkpoint)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        log(runtime.describe(args))
    amp, scaler = runtime.autocast(args.amp, device)
    # the encoding passes (validation, the NFB's views, caches) take --micro-batch's rows at once
    enc = Encoder(model, args.micro_batch or args.batch_size, device, args.workers, amp, rank,
                  world)
    images, val = image_sources(args, enc, train, out / "bank.pt", resume is not None)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    # one fused kernel for all parameters (CUDA; CPU from torch 2.4): a loop took 1/10 of a CPU step
    fused = device.type == "cuda" or device.type == "cpu" and torch.__version__ >= (2, 4)
    opt = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.98), eps=1e-6,
                            fused=fused or None)
    total = max(1, min(len(train) // args.batch_size, args.max_steps or math.inf) * args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(args.lr_warmup * total)))
    nfb = None if args.no_nfb else NoiseFilter(
        len(train), args.warmup_epochs, args.gmm, gate=args.nfb_gate, views=args.nfb_views,
        noisy_gt=train.noise_field if train.noisy.any() else None)
    run = Run(args, model, net, opt, sched, scaler, amp, nfb, train, images, val, enc, out, rank,
              world, device)
    if resume is not None:
        restore(run, resume)
    elif args.stage == 2 and nfb is not None:
        carry_over(run, init)
    return run

def init_model(args, init):
    """A stage-1 checkpoint (--init, --resume: its architecture and image pipeline, as SPN's bank
    must be stage 1's features) or CLIP by name / path with fresh WCB heads."""
    if init is None:
        clip, _ = load_clip(args.clip, device="cpu")
        return CIRModel(clip, wcb=not args.no_wcb, n_maps=args.wcb_maps, wcb_hidden=args.wcb_hidden)
    return runtime.build_model(init)

def freeze(model, args):
    """--encoder text freezes the image tower; stage 2 the image side, WCB image heads included
    (SPN: the bank must not move)."""
    text_side = lambda n: not n.startswith(("clip.visual.", "wcb_ref.", "wcb_tar."))
    for n, p in model.named_parameters():
        if args.stage == 2:
            p.requires_grad = p.requires_grad and text_side(n)  # CLIP's unused logit_scale: frozen
        elif args.encoder == "text" and n.startswith("clip.visual."):
            p.requires_grad = False

def image_sources(args, enc, train, bank_path, resume):
    """The training images as the loader's indices reach them and the validation sets [(name,
    ImageSource, triplets)]: files read by the workers, or decoded once (--cache-images); with a
    frozen image side computed once: its tokens (--encoder text) or SPN's features and bank
    (stage 2, saved to bank_path, read back on resume)."""
    def source(ds):
        res = enc.model.clip.image_resolution
        tf = make_transform(args.transform, res, pixels=args.cache_images)
        return (ImageSource.pixels(ds, tf, args.workers) if args.cache_images
                else ImageSource.files(ds, tf))
    images = source(train)
    if args.stage == 2:
        images = ImageSource.features(train, enc, images, bank_path, resume)
    elif args.encoder == "text":
        images = ImageSource.tokens(train, enc, images)
    sets = evaluate.eval_sets(args, data.DATASETS[args.dataset].eval_split)
    val = [(name, source(ds), ds) for name, ds in sets]
    log(f"train: {len(train)} triplets over {len(train.images)} images, "
        f"{int(train.noisy.sum())} noisy")
    return images, val

def param_groups(model, args):
    """AdamW groups: CLIP at --lr, WCB heads at --lr-wcb; weight decay on matrices only."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = args.lr if name.startswith("clip.") else args.lr_wcb
            groups.setdefault((lr, args.wd if p.dim() >= 2 else 0.0), []).append(p)
    return [dict(params=ps, lr=lr, weight_decay=wd) for (lr, wd), ps in groups.items()]

def lr_lambda(total, warm):
    """Linear warm-up over `warm` steps, then cosine decay to 0 at `total`."""
    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f

def restore(run, resume):
    """last.pt back in place: optimiser, schedule, scaler, soft labels, random streams, log."""
    run.opt.load_state_dict(resume["optimizer"])
    run.sched.load_state_dict(resume["scheduler"])
    run.scaler.load_state_dict(resume["scaler"])
    if run.nfb is not None:
        run.nfb.load_state_dict(resume["nfb"])
    runtime.set_rng_state(resume["rng"])
    if run.rank == 0:  # the log as of the checkpoint: a later epoch is trained (and logged) again
        atomic_write(run.out / "log.jsonl",
                     "".join(json.dumps(strict_json(r)) + "\n" for r in resume["history"]))
    log(f"resumed {run.out} after epoch {resume['epoch']}")
    if (was := resume["args"]["epochs"]) != run.args.epochs:
        log(f"--epochs {run.args.epochs} (the run had {was}): the learning rate follows the "
            f"cosine schedule of {run.args.epochs} epochs from the step reached")
    run.start, run.best, run.history = resume["epoch"] + 1, resume["best"], resume["history"]

def carry_over(run, init):
    """SPN stage 2 starts from stage 1's soft labels if they describe the same training triplets;
    otherwise the NFB warms up again."""
    a, nfb = run.args, init.get("nfb")
    differ = runtime.triplet_changes(init["args"], vars(a))
    if nfb and not differ and len(nfb["weights"]) == len(run.train):
        run.nfb.carry_over(nfb)
        flagged = int((run.nfb.weights < 0.5).sum())
        log(f"NFB: soft labels of {a.init} carried over ({flagged} pairs flagged)")
        return
    why = f"its triplets differ ({', '.join(differ) or 'count'})" if nfb else "it has no NFB"
    log(f"NFB: stage-1 soft labels not carried over: {why}; warm-up of {a.warmup_epochs} epoch(s)")
    if a.warmup_epochs >= a.epochs and run.rank == 0:
        print(f"warning: --warmup-epochs {a.warmup_epochs} >= --epochs {a.epochs}: every epoch is "
              "a warm-up, the noise filter's labels are never used (pass --no-nfb, or more "
              "--epochs)", file=sys.stderr)

# -----------------------------------------------------------------------------
# one step: batch -> features -> logits -> loss

def train_step(run, batch, w):
    """One optimizer step on a batch (tokens (B, L), ref, tgt, idx (B,)) with soft labels w (B,) or
    None. ref, tgt: the image source's inputs (images, or a frozen tower's tokens; stage 2: f_ref
    and the targets' rows in the bank). --micro-batch: cached_backward. -> the loss."""
    a, (tokens, ref, tgt, _) = run.args, batch
    run.opt.zero_grad(set_to_none=True)
    if a.micro_batch:
        loss = cached_backward(run, tokens, ref, tgt, w)
    else:
        with run.amp:
            q, t, pen = features(run, run.net, tokens, ref, tgt)           # q, t (B, D)
            loss = batch_loss(run, q, t, tgt, w) + a.div_weight * pen
        run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.opt)
    params = [p for g in run.opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return loss.item()

def features(run, net, tokens, ref, tgt):
    """q = normalize(f_txt + f_ref) (B, D), t = normalize(f_tar) (B, D) (stage 2: None, the bank
    holds the targets), the WCB heads' diversity penalty."""
    return net(tokens, ref, tgt if run.images.bank is None else None)

def batch_loss(run, q, t, tgt, w):
    """L_NCE, or L^soft_NCE with the NFB's labels w (B,): the queries q (B, D) against the targets
    of the global batch (t of every process, gathered), or in SPN's stage 2 (more negatives)
    against the static bank of every training target, tgt (B,) their rows in it."""
    if run.images.bank is None:
        t_all = runtime.gather_with_grad(t)                                # (W·B, D)
        pos = torch.arange(len(q), device=q.device) + run.rank * len(q)    # my targets in t_all
    else:
        t_all, pos = run.images.bank, tgt                                  # (N, D), (B,)
    if w is None:                                            # L_NCE: logits q t_all / τ
        return info_nce(q, t_all, run.args.tau, pos=pos)
    return soft_nce(q, t_all, w, run.args.tau, pos=pos, soft=run.args.soft_label)

def cached_backward(run, tokens, ref, tgt, w):
    """--micro-batch N: the whole batch's loss and gradients with the towers' memory of N (gradient
    caching, Gao et al., RepL4NLP 2021). L reaches the weights θ only through q and t, and the
    penalty is a mean over the batch, so over the micro-batches m of N of the B pairs:
        ∂L/∂θ = Σ_m (∂L/∂q_m)ᵀ ∂q_m/∂θ + (∂L/∂t_m)ᵀ ∂t_m/∂θ + λ (N/B) ∂pen_m/∂θ
      1. q, t (B, D) micro-batch by micro-batch, without a graph (inference mode: no autograd at
         all) but for the last one's (N pairs' activations, as step 3 holds: a forward less);
      2. the loss of the whole batch from q, t as leaves: ∂L/∂q, ∂L/∂t (B, D);
      3. backward from q_m·∂L/∂q_m + t_m·∂L/∂t_m + λ (N/B) pen_m: the kept graph, then each other
         micro-batch run again with its graph. Under torchrun the gradients are summed locally
         and averaged once, in the last backward. -> the loss."""
    B, n = len(tokens), run.args.micro_batch
    parts = [slice(s, s + n) for s in range(0, B, n)]
    inputs = lambda s: (tokens[s], take_rows(ref, s), take_rows(tgt, s))
    share = lambda s: len(range(B)[s]) / B                  # the micro-batch's part of the mean
    with torch.inference_mode(), run.amp, running_stats_kept(run.model):           # 1.
        outs = [features(run, run.model, *inputs(s)) for s in parts[:-1]]
    with run.amp, sync(run, len(parts) == 1):
        kept = features(run, run.net, *inputs(parts[-1]))
    qs, ts, pens = zip(*outs, [x if x is None else x.detach() for x in kept])
    q = torch.cat(qs).float().requires_grad_()                                     # (B, D)
    t = None if ts[0] is None else torch.cat(ts).float().requires_grad_()          # (B, D)
    pen = sum(p * share(s) for p, s in zip(pens, parts))
    loss = batch_loss(run, q, t, tgt, w) + run.args.div_weight * pen
    loss.backward()                                                                # 2.
    grads = lambda s: (q.grad[s], None if t is None else t.grad[s])
    with sync(run, len(parts) == 1):                                               # 3.
        backward_cached(run, kept, *grads(parts[-1]), share(parts[-1]))
    for i, s in enumerate(parts[:-1]):
        with sync(run, i == len(parts) - 2):
            with run.amp:
                out = features(run, run.net, *inputs(s))
            backward_cached(run, out, *grads(s), share(s))
    return loss.detach()

def backward_cached(run, out, g_q, g_t, share):
    """Step 3 of cached_backward for one micro-batch: its features out = (q_m, t_m, pen_m), their
    cached gradients g_q, g_t (N, D) (g_t None: stage 2's bank), its share N/B of the penalty."""
    q_m, t_m, pen_m = out
    cached = (q_m.float() * g_q).sum() + run.args.div_weight * share * pen_m
    if g_t is not None:
        cached = cached + (t_m.float() * g_t).sum()
    run.scaler.scale(cached).backward()

def sync(run, last):
    """Under torchrun, a micro-batch's forward and backward: its gradients summed locally
    (DDP's no_sync), but the last one's, whose backward averages the sums over the processes."""
    return nullcontext() if last or run.world == 1 else run.net.no_sync()

def take_rows(x, s):
    """Rows s of a step's input: a tensor, or the Tokens / Features around one."""
    return x[s] if isinstance(x, torch.Tensor) else type(x)(x.f[s])

# -----------------------------------------------------------------------------
# the epoch

def train_epoch(run, epoch):
    """One pass: the epoch's pairs and soft labels, then train_step on each batch. -> log fields."""
    a = run.args
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    keep, w_all = epoch_labels(run, epoch)
    total, steps, t_data, t_step = 0.0, 0, 0.0, 0.0
    loader = make_loader(run, epoch, keep=keep)
    bar = tqdm(loader, desc=f"epoch {epoch}", total=min(len(loader), a.max_steps or len(loader)),
               disable=run.rank != 0, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for batch in bar:
        batch = on_device(run, batch)
        t1 = time.perf_counter()
        value = train_step(run, batch, None if w_all is None else w_all[batch[3]].to(run.device))
        if not math.isfinite(value):
            raise FloatingPointError(f"epoch {epoch}, step {steps}: the loss is {value}; the run "
                                     "diverged (lower --lr, or try --amp none). last.pt still "
                                     "holds the previous epoch")
        total, steps = total + value, steps + 1
        t2 = time.perf_counter()
        t_data, t_step, t0 = t_data + t1 - t0, t_step + t2 - t1, t2
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
        if a.max_steps and steps >= a.max_steps:
            break
    rec = dict(epoch=epoch, loss=total / max(1, steps), lr=run.sched.get_last_lr()[0],
               time_data=t_data, time_step=t_step)
    if run.device.type == "cuda":     # the steps' peak (tools.memory computes it beforehand)
        rec["gpu_peak_gib"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 30
    return rec

def epoch_labels(run, epoch):
    """-> (keep (n,) bool or None, w (n,) or None). --oracle keeps the clean triplets; past the
    warm-up the NFB's w draws the pairs (--soft-label sample) or weighs them (the others)."""
    a, nfb = run.args, run.nfb
    if a.oracle:
        return ~run.train.noisy, None
    if nfb is None or not nfb.active(epoch):
        return None, None
    if a.soft_label == "sample":
        return nfb.draw(torch.Generator().manual_seed(a.seed * 1000 + epoch)), None
    return None, nfb.weights

def on_device(run, batch):
    """A loader batch as the step takes it: tokens on the device, images through run.images."""
    tokens, ref, tgt, idx = batch
    dev = run.device
    return (tokens.to(dev, non_blocking=dev.type == "cuda"), run.images.inputs(ref, dev, "ref"),
            run.images.inputs(tgt, dev, "tgt"), idx)

def collate(items, images, context_length=77):
    """Items (ref_idx, text, tgt_idx, i) -> tokens (B, L), ref, tgt (images.load's: images read in
    the loader's workers, or the indices), idx (B,)."""
    ref, text, tgt, idx = zip(*items)
    tokens = tokenize(list(text), context_length, truncate=True)
    return tokens, images.load(ref), images.load(tgt), torch.tensor(idx)

def make_loader(run, epoch, keep=None):
    """A fresh loader per epoch, its order and worker seeds from (seed, epoch) only: resumable
    exactly. keep (n,) bool: the epoch cycles over these triplets only (epoch_order)."""
    a, ds, world = run.args, run.train, run.world
    g = torch.Generator().manual_seed(a.seed * 1000 + epoch)
    sampler = None
    if keep is not None or a.group_batches:
        keep = torch.ones(len(ds), dtype=torch.bool) if keep is None else keep
        sampler = epoch_order(keep, g, (run.rank, world), ds.ref_idx if a.group_batches else None)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(ds, world, run.rank, shuffle=True,
                                                      seed=a.seed, drop_last=True)
        sampler.set_epoch(epoch)
    collate_fn = functools.partial(collate, images=run.images,
                                   context_length=run.model.clip.context_length)
    workers = a.workers if run.images.in_workers else 0  # cached: no workers, they take cores
    return torch.utils.data.DataLoader(
        ds, batch_size=a.batch_size // world, shuffle=sampler is None, sampler=sampler, generator=g,
        num_workers=workers, drop_last=True, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available())

def epoch_order(keep, g, shard=(0, 1), groups=None):
    """An epoch over the kept triplets only, with a full epoch's samples (and optimizer steps):
    permutations of the kept set, concatenated, then this rank's share (shard = (rank, world)).
    keep (n,) bool: --oracle's clean triplets (a noisy run's ceiling), or --soft-label sample's
    draw. groups (n,): --group-batches puts each group's members together."""
    kept = keep.nonzero().squeeze(1)                                     # (n_kept,)
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} training triplets kept (--oracle: clean ones); "
                         "lower --noise")
    n, (rank, world) = len(keep), shard
    perms = [grouped(kept[torch.randperm(len(kept), generator=g)], groups, g)
             for _ in range(-(-n // len(kept)))]
    return torch.cat(perms)[:n][rank::world][:n // world].tolist()

def grouped(idx, groups, g):
    """idx (k,) in random order -> the same, each group's members side by side, the groups in
    random order (--group-batches: a query meets its group's other targets in its batch)."""
    if groups is None:
        return idx
    uniq, inv = groups[idx].unique(return_inverse=True)                  # inv (k,)
    group_rank = torch.randperm(len(uniq), generator=g)[inv]             # (k,) a random group rank
    return idx[torch.argsort(group_rank * len(idx) + torch.arange(len(idx)))]

# -----------------------------------------------------------------------------
# after each epoch: the NFB's refit, validation, the checkpoints

def refit_noise_filter(run, epoch):
    """NFB: the views of every training pair (all ranks') -> a GMM per view -> the next epoch's
    soft labels, the same on every rank. -> log fields (nfb_*); plots the query view's losses."""
    t = time.perf_counter()
    views = {k: v.cpu() for k, v in noise_views(run).items()}
    stats = run.nfb.update(views, epoch)
    if run.world > 1:                                   # one GMM: the same soft labels on all ranks
        w = run.nfb.weights.to(run.device)
        dist.broadcast(w, 0)
        run.nfb.weights = w.cpu()
    if run.rank == 0:
        plots.loss_histogram(views["query"], stats, run.out / f"loss_hist_epoch{epoch:03d}.png",
                             epoch, noisy=run.train.noisy if run.train.noisy.any() else None)
    return dict(time_nfb=time.perf_counter() - t, **{f"nfb_{k}": v for k, v in stats.items()})

@torch.no_grad()
def noise_views(run):
    """The NFB's views (nfb.pair_views) of every training pair: {name: (n,) losses}; the images
    through the model once, the distinct texts once, each process its share (pair_features)."""
    pf = pair_features(run.enc, run.images, run.train)
    return pair_views(pf, run.args.nfb_views, run.args.tau)

def nfb_line(rec):
    """The NFB's part of an epoch's log line: the pairs it flags (AUC where the noise is known), or
    that its gate found no noise."""
    if "nfb_n_noisy" not in rec:
        return ""
    if rec.get("nfb_gated"):
        return " | NFB gate shut: no noise-like mode, every w = 1"
    auc = f" AUC {rec['nfb_auc']:.3f}" if rec.get("nfb_auc") is not None else ""
    return f" | NFB noisy {rec['nfb_n_noisy']}{auc}"

def save_epoch(run, rec):
    """best.pt (on a new best), then last.pt, then the log line: a kill between two writes never
    leaves a log or a last.pt that claims more than the files before it hold."""
    a, nfb = run.args, run.nfb.state_dict() if run.nfb else None
    if rec["score"] > run.best:
        atomic_write(run.out / "best.pt", dict(model=run.model.state_dict(), args=vars(a),
                                               epoch=rec["epoch"], metrics=rec["metrics"], nfb=nfb))
        run.best = rec["score"]
    atomic_write(run.out / "last.pt", dict(
        model=run.model.state_dict(), optimizer=run.opt.state_dict(),
        scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(), nfb=nfb,
        epoch=rec["epoch"], best=run.best, history=run.history, args=vars(a),
        rng=runtime.rng_state()))
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps(strict_json(rec)) + "\n")

# -----------------------------------------------------------------------------
# main

def main(argv=None):
    run = build(runtime.settings(argv, __doc__))
    a = run.args
    for epoch in range(run.start, a.epochs):
        t = time.perf_counter()
        rec = train_epoch(run, epoch)
        if run.nfb is not None:
            rec.update(refit_noise_filter(run, epoch))
        # each process encodes its share of the validation set (same metrics on all); metrics["avg"]
        # picks best.pt: CIRR (R@5 + Rsubset@1)/2, FashionIQ (R@10 + R@50)/2, Shoes mean R@1/10/50
        metrics = evaluate.evaluate_sets(run.enc, run.val, a.dataset)
        rec.update(metrics=metrics, score=metrics["avg"], time_epoch=time.perf_counter() - t)
        if run.rank == 0:
            run.history.append(rec)
            plots.recall_curves(run.history, run.out / "recall.png")
            save_epoch(run, rec)
            log(f"epoch {epoch}: loss {rec['loss']:.4f} | " + evaluate.format_metrics(metrics)
                + nfb_line(rec) + f" | {rec['time_epoch']:.0f} s")
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
        sys.exit(f"error: {error_line(e)}")
