"""A run's settings and plumbing, outside the paper: settings every script reads, one process or many,
checkpoints that survive a kill, the one model loader.

  settings     PRESETS per dataset, the flags of train.py (parser), settings (resolved, checked and frozen
               in one place, before any data or model: the command line, then a resumed run's own, then an
               --init checkpoint's model, then SPN stage 2's and the dataset's presets), defaults (a
               dataset's settings with nothing given), triplet_changes
  processes    setup_distributed (plain python, or torchrun: NCCL on GPUs, Gloo on CPUs),
               gather_with_grad (the global batch's targets for every rank's queries), gather_rows
  checkpoints  rng_state / set_rng_state (exact resume), load_checkpoint (weights_only, one-line errors),
               build_model, load_model (a run's model or a released CLIP: evaluate, search, audit, spn)
  precision    autocast (bf16 where the GPU has it, else fp16 with a gradient scaler; CPU: fp32)
"""

import argparse
import json
import os
import random
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import toy
import triplets
from loss import SOFT_FORMS
from model import TINY_CONFIGS, CIRModel, available_models, build_clip, load_clip
from nfb import VIEWS
from util import ArgumentParser


# -----------------------------------------------------------------------------
# settings: presets, the flags, resolved, checked and frozen in one place

# The datasets' presets; a flag given on the command line wins. The real datasets share CLIP4Cir's recipe;
# the toy trains a tiny CLIP from scratch. A preset is a recipe (model, schedule, input pipeline), never
# data: noise enters only through --noise (the toy benchmark's own default, TOY_NOISE, is --dataset toy's).
# cache_images: decode every image once into RAM; group_batches: batches of whole groups (a reference's
# triplets), so a query meets its near misses.
REAL = dict(clip="RN50x4", epochs=10, batch_size=128, lr=2e-6, lr_wcb=1e-4, tau=0.01, transform="targetpad",
            warmup_epochs=1, cache_images=False, group_batches=False)
PRESETS = {
    "toy": dict(clip="tiny", epochs=7, batch_size=128, lr=1e-3, lr_wcb=1e-3, tau=0.05, transform="clip",
                warmup_epochs=1, cache_images=True, group_batches=True),
    "cirr": REAL, "fashioniq": REAL, "shoes": REAL, "triplets": REAL,
}
# Fixed for every run (settings keys, not flags): AdamW weight decay on matrices, the share of steps with a
# linear LR warm-up, the gradients' max norm, the WCB scorer's hidden width (0: linear)
FIXED = dict(wd=0.05, lr_warmup=0.05, grad_clip=1.0, wcb_hidden=0)
TOY_NOISE = 0.3             # --noise of --dataset toy when none is given (every other dataset: 0)
RUN = dict(amp="auto", workers=2)  # not tied to a dataset; on --resume the run's own unless given again
# SPN stage 2: SPN's settings for CLIP4Cir on real data; the toy's CLIP is trained from scratch
STAGE2 = {"toy": dict(epochs=3, lr=1e-4, lr_wcb=1e-4), "cirr": dict(epochs=3, lr=2e-5, tau=0.02)}
STAGE2.update(fashioniq=STAGE2["cirr"], shoes=STAGE2["cirr"], triplets=STAGE2["cirr"])
# --resume applies these when given again (--epochs extends the run); any other flag given with another
# value than the run's is refused
RESUME_FLAGS = ("epochs", "amp", "workers")
PATHS = ("data_root", "train_file", "init", "extra_triplets", "out")   # stored absolute
# an --init checkpoint's model wins over the flags: SPN's bank must be the stage-1 model's features
MODEL_KEYS = ("clip", "no_wcb", "wcb_maps", "wcb_hidden", "transform", "categories")
# what makes a run's training triplets: two runs with these equal train on the same triplets
TRIPLETS = ("dataset", "categories", "noise", "noise_kind", "seed", "skip_missing", "extra_triplets",
            "train_file")
# Flags that were removed: given again, one line says so and where to look
DROPPED = "it was measured and lost; its numbers are in docs/choices.md, 'Tried and dropped'"
FIXED_NOW = "it is fixed now (docs/choices.md, 'Fixed settings')"
PRESET_NOW = "it is part of the dataset's preset now (--preset toy: on; docs/choices.md, 'Fixed settings')"
REMOVED = {
    **dict.fromkeys(["--nfb-keep", "--nfb-gate-once", "--nfb-teacher", "--nfb-ema-decay", "--nfb-losses",
                     "--nfb-gate-by", "--nfb-budget", "--nfb-text-inverted", "--no-nfb-text-inverted",
                     "--nfb-measure"], DROPPED),
    **dict.fromkeys(["--lr-warmup", "--grad-clip", "--wd", "--wcb-hidden", "--nfb-text-temp", "--nfb-width"],
                    FIXED_NOW),
    **dict.fromkeys(["--cache-images", "--no-cache-images", "--group-batches", "--no-group-batches"],
                    PRESET_NOW),
    **dict.fromkeys(["--plots", "--no-plots"], "the plots are always drawn now"),
    "--print-settings": "a run prints its settings as it starts and keeps them in args.json",
}
REMOVED_VALUES = {("--soft-label", "spread"), ("--nfb-views", "subset"), ("--nfb-views", "gain")}


def parser(description=None):
    p = ArgumentParser(description)
    add = p.add_argument
    add("--dataset", default="toy", choices=list(PRESETS), help="the benchmark, or triplets: your own")
    add("--data-root", default=None, help="dataset folder (toy: data/toy beside the code, generated on first "
        "use; triplets: the folder of train.jsonl, val.jsonl); stored absolute in the run")
    add("--train-file", default=None, help="--dataset triplets: another training file than "
        "<data-root>/train.jsonl, e.g. an audit's clean.jsonl (image paths relative to --data-root)")
    add("--preset", default=None, choices=list(PRESETS), help="take another dataset's recipe (e.g. --dataset "
        "triplets --preset toy: the toy's tiny CLIP and schedule, without its noise)")
    add("--categories", nargs="+", default=list(data.FIQ_CATEGORIES), help="FashionIQ categories")
    add("--clip", default=None, help="OpenAI model name (" + ", ".join(available_models()) + "), a checkpoint "
        "path, or a tiny config trained from scratch (" + ", ".join(TINY_CONFIGS) + ")")
    add("--encoder", default="both", choices=["both", "text"],
        help="what of CLIP is fine-tuned: both towers, or the text side (image tokens cached once)")
    add("--transform", default=None, choices=["clip", "targetpad"],
        help="image preprocessing: CLIP's resize and centre crop, or CLIP4Cir's target pad")
    add("--epochs", type=int, default=None, help="epochs to train (with --resume: extends the run)")
    add("--batch-size", type=int, default=None, help="global batch (split over the processes)")
    add("--lr", type=float, default=None, help="learning rate of CLIP's weights")
    add("--lr-wcb", type=float, default=None, help="learning rate of the WCB heads")
    add("--tau", type=float, default=None, help="temperature of the logits q·t/τ")
    add("--amp", default=None, choices=["auto", "bf16", "fp16", "none"], help="autocast, GPU only (auto)")
    add("--workers", type=int, default=None, help="DataLoader workers per process (2)")
    add("--noise", type=float, default=None, help="fraction of training triplets to corrupt in memory (the "
        f"files are never changed); default 0, the toy benchmark's {TOY_NOISE}")
    add("--noise-kind", default="shuffle", help="how: " + ", ".join(triplets.NOISE_KINDS)
        + " (shuffle: the field's protocol; see triplets.inject_noise)")
    add("--oracle", action="store_true",
        help="the ceiling: train only on the triplets known to be clean, for the same number of steps")
    add("--skip-missing", action="store_true", help="drop triplets whose images are missing")
    # the method's switches (each one is an ablation)
    add("--no-wcb", action="store_true", help="no Weight Compensation Block (plain CLIP features)")
    add("--wcb-maps", type=int, default=2, help="K, weight maps per WCB head")
    add("--div-weight", type=float, default=0.1, help="λ of the WCB diversity penalty")
    add("--no-nfb", action="store_true", help="no Noise-pair Filter Block (plain InfoNCE throughout)")
    add("--warmup-epochs", type=int, default=None, help="epochs of plain InfoNCE before the first GMM")
    add("--gmm", default="sklearn", choices=["sklearn", "torch"],
        help="the NFB's GMM: scikit-learn's, or the same EM in torch (on the losses' device)")
    add("--soft-label", default="sample", choices=["sample", *SOFT_FORMS],
        help="L^soft_NCE (loss.py): sample pair i into an epoch with probability w_i; weight its l_i by w_i; "
        "or complement: a flagged pair teaches only what its query is not, -log(1 - p_ij) over the other "
        "targets, weighted by 1 - w_i (RCL)")
    add("--nfb-gate", type=float, default=0.02, help="nats per pair by which two Gaussians must beat one "
        "Gamma on the query view's losses, its noisy component 1.25x the wider, else every w = 1 (no second "
        "mode: no noise; 0: no gate)")
    add("--nfb-views", nargs="+", default=["query", "text"], choices=VIEWS,
        help="the views of each training pair the NFB decides on, query first (it says whether there is "
        "noise at all); a pair is flagged when any view flags it (nfb.pair_views)")
    # SPN
    add("--stage", type=int, default=1, choices=[1, 2], help="2: SPN static-bank stage")
    add("--init", default=None, help="checkpoint to start from (required by --stage 2)")
    add("--extra-triplets", default=None, help="generated positives (spn.py) added to training")
    # run
    add("--seed", type=int, default=0, help="model init, data order, injected noise, the NFB's draws")
    add("--out", default=None, help="run folder (default runs/<dataset>-<time> in the working directory, "
        "where evaluate.py looks for the latest run)")
    add("--resume", default=None, help="run folder or last.pt to continue")
    add("--max-steps", type=int, default=None, help="stop each epoch after this many steps (debug)")
    for action in p._actions:                          # the preset-dependent defaults, said in --help
        if action.dest in PRESETS["toy"] and action.help:
            toy_v, real = PRESETS["toy"][action.dest], REAL[action.dest]
            action.help += f" (preset: toy {toy_v}, real data {real})" if toy_v != real else \
                f" (preset: {toy_v})"
    return p


class Settings(argparse.Namespace):
    """A run's settings: every key resolved by `settings`, then frozen (build reads, never writes them)."""

    def freeze(self):
        self.__class__ = Frozen
        return self


class Frozen(Settings):
    def __setattr__(self, key, value):
        raise AttributeError(f"the settings are frozen (runtime.settings): {key} cannot change")


def settings(argv=None, description=None):
    """Every setting of a training run, resolved, checked and frozen before any data or model is touched.
    The command line wins; then, for --resume, the run's own settings; then an --init checkpoint's model;
    then stage 2's and the dataset's presets; flags newer than a resumed run take their defaults. The toy's
    folder, the run folder and every path are resolved here and stored absolute."""
    p = parser(description)
    argv = sys.argv[1:] if argv is None else argv
    flag = None
    for arg in argv:
        flag = arg.split("=")[0] if arg.startswith("-") else flag
        if arg in REMOVED or arg.split("=")[0] in REMOVED:
            p.error(f"{flag} was removed: {REMOVED[flag]}")
        if (flag, arg.split("=")[-1]) in REMOVED_VALUES:
            p.error(f"{flag} {arg.split('=')[-1]} was removed: {DROPPED}")
    args = p.parse_args(argv, namespace=Settings())
    if args.resume:
        args = resumed(args, given(p, argv), p)
    check(resolve(args), p)                   # a resumed run's settings, with what was given again, too
    if args.resume:
        finished(args)
    if args.dataset == "toy":
        args.data_root = args.data_root or str(toy.default_toy_root())
    args.out = args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"   # working directory's
    for k in PATHS:
        if getattr(args, k):
            setattr(args, k, str(Path(getattr(args, k)).expanduser().resolve()))
    if args.init and not args.resume:
        init = load_checkpoint(args.init, "--init", mmap=True)["args"]
        if init["dataset"] != args.dataset:
            p.error(f"--init {args.init} was trained on {init['dataset']}, not {args.dataset}; pass "
                    f"--dataset {init['dataset']} or a {args.dataset} checkpoint")
        for k in MODEL_KEYS:
            setattr(args, k, init.get(k, FIXED.get(k)))
    return args.freeze()


def given(p, argv):
    """{dest: value} of the flags named on the command line (defaults left out)."""
    q = parser(p.description)
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return vars(q.parse_args(argv))


def resumed(args, flags, p):
    """--resume: the run's own settings (its args.json, else last.pt's), with the flags of RESUME_FLAGS given
    again applied; any other flag given with another value than the run's is refused in one line."""
    path = Path(args.resume) / "last.pt" if Path(args.resume).is_dir() else Path(args.resume)
    if not path.is_file():
        p.error(f"--resume {args.resume}: no {path}; pass a run folder holding last.pt (or the file itself)")
    saved = json.loads((path.parent / "args.json").read_text()) if (path.parent / "args.json").is_file() \
        else load_checkpoint(path, "--resume", mmap=True)["args"]
    saved = {**vars(defaults(saved["dataset"])), **saved}     # flags newer than the run take their defaults
    run = path.parent
    saved["out"] = str(run)                                   # the run folder, wherever it was started from
    for k, v in flags.items():
        if k in RESUME_FLAGS or k == "resume" or same(k, v, saved.get(k)):
            continue
        p.error(f"--resume {run}: --{k.replace('_', '-')} {v} differs from the run's {saved.get(k)}; a "
                f"resumed run keeps its settings (only --{', --'.join(f.replace('_', '-') for f in RESUME_FLAGS)}"
                " may change): leave it out, or start a new run with --out DIR")
    return Settings(**{**saved, **{k: flags[k] for k in RESUME_FLAGS if k in flags}, "resume": str(path),
                       "out": str(run)})


def finished(args):
    """A resumed run that has trained its --epochs already stops here, in one line, before any data or model
    (last.pt is mapped, not read)."""
    ckpt = load_checkpoint(args.resume, "--resume", mmap=True)
    done, planned = ckpt["epoch"] + 1, ckpt["args"]["epochs"]
    if args.epochs <= done:
        more = f" with --epochs {args.epochs}" if args.epochs != planned else ""
        print(f"{Path(args.resume).parent}: the run has trained {done} epoch{'s' * (done > 1)} of its "
              f"{planned}; nothing to resume{more} (pass --epochs N > {done} to train it longer)")
        sys.exit(0)


def same(key, a, b):
    """A flag's value given again equals the run's (paths compared where they point)."""
    if key in PATHS and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b or isinstance(a, (list, tuple)) and list(a) == list(b or ())


def describe(args):
    """The settings as lines of `key=value` within 100 characters (FashionIQ's categories only for it)."""
    skip = () if data.DATASETS[args.dataset].protocol == "fashioniq" else ("categories",)
    items = " ".join(f"{k}={v}" for k, v in vars(args).items() if k not in skip)
    return "settings:\n" + textwrap.fill(items, 100, initial_indent="  ", subsequent_indent="  ",
                                          break_on_hyphens=False)


def defaults(dataset):
    """A training run's settings for a dataset with nothing given (the dataset's presets), unchecked."""
    return resolve(parser().parse_args(["--dataset", dataset], namespace=Settings()))


def resolve(args):
    """Fill what the command line left open from stage 2's and the dataset's presets."""
    preset = args.preset or args.dataset
    noise = TOY_NOISE if args.dataset == "toy" else 0.0       # the data's, whatever the recipe
    presets = dict(PRESETS[preset], noise=noise, **FIXED, **RUN, **(STAGE2[preset] if args.stage == 2 else {}))
    for k, v in presets.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def check(args, p):
    """The rules a run's settings must meet; each failure is one line naming the flag and the fix."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    root = Path(args.data_root).expanduser() if args.data_root else None
    rules = [
        (args.epochs >= 1, f"--epochs {args.epochs}: train at least 1 epoch"),
        (args.batch_size >= 2, f"--batch-size {args.batch_size}: contrastive training needs at least 2 pairs"),
        (args.batch_size % world == 0, f"--batch-size {args.batch_size} must be divisible by the {world} "
                                       "processes"),
        (args.tau > 0, f"--tau {args.tau}: the temperature of q·t/τ must be > 0 (0.01 for CLIP, 0.05 on the "
                       "toy)"),
        (args.lr >= 0 and args.lr_wcb >= 0, "--lr / --lr-wcb: learning rates must be >= 0"),
        (args.warmup_epochs >= 0, f"--warmup-epochs {args.warmup_epochs}: must be >= 0"),
        (args.nfb_gate >= 0, f"--nfb-gate {args.nfb_gate}: nats per pair, >= 0 (0: no gate)"),
        (args.nfb_views[0] == "query" and len(set(args.nfb_views)) == len(args.nfb_views),
         f"--nfb-views {' '.join(args.nfb_views)}: list each view once, query first (its loss says whether "
         "there is noise at all), e.g. --nfb-views query text"),
        (args.wcb_maps >= 2, f"--wcb-maps {args.wcb_maps}: the WCB needs K >= 2 weight maps to be diverse"),
        (args.workers >= 0, f"--workers {args.workers}: must be >= 0"),
        (args.max_steps is None or args.max_steps >= 1, f"--max-steps {args.max_steps}: must be >= 1"),
        (args.stage == 1 or args.init, "--stage 2 needs --init RUN/best.pt (a stage-1 checkpoint)"),
        (not args.init or Path(args.init).is_file(), f"--init {args.init}: no such file; pass a run's best.pt"),
        (not args.extra_triplets or Path(args.extra_triplets).is_file(),
         f"--extra-triplets {args.extra_triplets}: no such file; write one with `python spn.py`"),
        (args.dataset == "toy" or args.data_root, f"--dataset {args.dataset} needs --data-root DIR (the "
                                                  "dataset folder in its official layout, README: Data)"),
        (not root or root.is_dir() or args.dataset == "toy" and not root.exists(),
         f"--data-root {args.data_root}: " + ("a file, not a folder" if root and root.exists() else
                                              "no such folder") + f"; point it at the {args.dataset} dataset folder"),
        (not args.oracle or args.noise or args.dataset in ("toy", "triplets"),
         "--oracle trains on the triplets known to be clean, and without injected noise (--noise > 0) "
         f"nothing about {args.dataset}'s triplets is known; add --noise"),
        (not args.train_file or args.dataset == "triplets" and Path(args.train_file).expanduser().is_file(),
         f"--train-file {args.train_file}: " + ("no such file" if args.dataset == "triplets" else
                                                "only with --dataset triplets") + "; pass an audit's clean.jsonl"),
        (args.init or args.clip in TINY_CONFIGS or args.clip in available_models() or Path(args.clip).is_file(),
         f"--clip {args.clip}: not a released model ({', '.join(available_models())}) nor a file"),
    ]
    for ok, message in rules:
        if not ok:
            p.error(message)
    try:
        triplets.check_noise(noise_of(args), has_subsets=data.DATASETS[args.dataset].subsets)
    except ValueError as e:
        p.error(str(e))
    # stage 2 may carry stage 1's labels over (no warm-up): train.carry_over warns when it cannot
    if not args.no_nfb and args.stage == 1 and args.warmup_epochs >= args.epochs and \
            int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: every epoch is a "
              "warm-up, the noise filter's labels are never used (pass --no-nfb, or more --epochs)",
              file=sys.stderr)


def noise_of(args):
    return triplets.Noise(args.noise, args.noise_kind, args.seed)


def triplet_changes(a, b):
    """The settings (dicts) by which two runs' training triplets differ (TRIPLETS); [] when the same."""
    return [k for k in TRIPLETS if a.get(k) != b.get(k)]


# -----------------------------------------------------------------------------
# distributed helpers: the same script runs with one process or under torchrun

def setup_distributed():
    """(rank, world, device): one process, or torchrun's (NCCL on GPUs, Gloo on CPUs)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            sys.exit(f"error: torchrun started process {local} of a node, and this machine has "
                     f"{torch.cuda.device_count()} GPU(s): pass --nproc_per_node {torch.cuda.device_count()} (or "
                     "CUDA_VISIBLE_DEVICES= to train on the CPUs with gloo)")
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


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, exact resume

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


def load_checkpoint(path, flag="--checkpoint", mmap=False):
    """A run's checkpoint (best.pt / last.pt), loaded with weights_only=True. Clear errors, no tracebacks.
    mmap: the tensors are mapped, not read (a look at the settings and the epoch costs next to nothing)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found (train one with `python train.py`, "
                         f"then pass {flag} runs/<run>/{'last' if flag == '--resume' else 'best'}.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def load_model(checkpoint=None, clip=None, dataset=None, device="cpu"):
    """The model evaluate, search, audit and spn work with: a run's checkpoint (default: the most recent
    run's best.pt under runs/) or a released CLIP zero-shot (sum fusion, no WCB).
    -> (model on device in eval mode, the run's settings ({} zero-shot), the checkpoint (None zero-shot),
    its path (or the CLIP's name)). dataset: the dataset the command works on, checked against the run's."""
    if clip and checkpoint:
        raise SystemExit("error: --clip (zero-shot CLIP) and --checkpoint (a trained run) name two models; "
                         "pass one")
    if clip:
        return CIRModel(load_clip(clip, device="cpu")[0], wcb=False).to(device).eval(), {}, None, clip
    path = Path(checkpoint) if checkpoint else latest_best()
    ckpt = load_checkpoint(path)
    trained = ckpt["args"]["dataset"]
    if dataset and dataset != trained:
        raise SystemExit(f"error: {path} was trained on {trained}, not {dataset}; pass --dataset {trained} "
                         f"or a {dataset} checkpoint")
    return build_model(ckpt).to(device).eval(), ckpt["args"], ckpt, path


def latest_best(runs="runs"):
    """The best.pt of the most recent run under runs/ (in the working directory)."""
    found = sorted(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"error: no run with a best.pt under {Path(runs).resolve()}; train one with "
                         f"`python train.py` or pass --checkpoint / --clip")
    print(f"using {found[-1]} (the most recent run)")
    return found[-1]


# -----------------------------------------------------------------------------
# precision

def autocast(amp, device):
    """--amp on this device -> (autocast context, GradScaler). GPU: bf16 where supported, else fp16 with a gradient
    scaler; CPU or --amp none: full precision, and the scaler is disabled (its calls pass through)."""
    if device.type != "cuda" or amp == "none":
        return nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def data_root(root, dataset):
    """The dataset's folder for evaluate and audit: given, the run's, or the toy's; one line when missing."""
    root = root or (str(toy.default_toy_root()) if dataset == "toy" else None)
    if not root:
        raise SystemExit(f"error: --dataset {dataset} needs --data-root DIR")
    if dataset != "toy" and not Path(root).expanduser().is_dir():
        raise SystemExit(f"error: --data-root {root}: no such folder; point it at the {dataset} dataset folder")
    return root
