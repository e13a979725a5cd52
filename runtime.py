"""A run's settings and plumbing, outside the paper: train.py's flags and PRESETS, resolved, checked
and frozen before any data or model (settings); one process or many (torchrun); checkpoints that
survive a kill, with exact resume; the one model loader; autocast."""

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

# A dataset's preset is a recipe (model, schedule, input pipeline), never data: noise enters only
# through --noise (default: the dataset's own, DATASETS[name].noise); a flag given wins. Real data:
# CLIP4Cir's recipe; the toy: a tiny CLIP from scratch. cache_images: every image decoded once into
# RAM; group_batches: batches of whole groups (a reference's triplets): a query meets near misses.
REAL = dict(clip="RN50x4", epochs=10, batch_size=128, lr=2e-6, lr_wcb=1e-4, tau=0.01,
            transform="targetpad", warmup_epochs=1, cache_images=False, group_batches=False)
PRESETS = dict(toy=dict(REAL, clip="tiny", epochs=7, lr=1e-3, lr_wcb=1e-3, tau=0.05,
                        transform="clip", cache_images=True, group_batches=True),
               cirr=REAL, fashioniq=REAL, shoes=REAL, triplets=REAL)
# fixed for every run (keys, not flags): AdamW's weight decay on matrices, the share of steps of
# linear LR warm-up, the gradients' max norm, the WCB scorer's hidden width (0: linear)
FIXED = dict(wd=0.05, lr_warmup=0.05, grad_clip=1.0, wcb_hidden=0)
RUN = dict(amp="auto", workers=2)  # no dataset's; on --resume the run's own unless given again
# SPN stage 2: SPN's settings for CLIP4Cir on real data; the toy's CLIP is trained from scratch
STAGE2 = dict(toy=dict(epochs=3, lr=1e-4, lr_wcb=1e-4), cirr=dict(epochs=3, lr=2e-5, tau=0.02))
STAGE2.update(fashioniq=STAGE2["cirr"], shoes=STAGE2["cirr"], triplets=STAGE2["cirr"])
# --resume: these may change (time and memory; the maths too only through ModifiedResNet's BatchNorm
# under --micro-batch); other flags are refused
RESUME_FLAGS = ("epochs", "amp", "workers", "micro_batch", "grad_checkpoint")
PATHS = ("data_root", "train_file", "init", "extra_triplets", "out")   # stored absolute
# an --init checkpoint's model wins over the flags: SPN's bank must be the stage-1 model's features
MODEL_KEYS = ("clip", "no_wcb", "wcb_maps", "wcb_hidden", "transform", "categories")
# two runs with these equal train on the same triplets
TRIPLETS = ("dataset", "categories", "noise", "noise_kind", "seed", "skip_missing",
            "extra_triplets", "train_file")
# removed flags: given again, one line says so and where to look
DROPPED = "it was measured and lost; its numbers are in docs/choices.md, 'Tried and dropped'"
REMOVED = {flag: why for why, flags in {
    DROPPED: "--nfb-keep --nfb-gate-once --nfb-teacher --nfb-ema-decay --nfb-losses --nfb-gate-by "
             "--nfb-budget --nfb-text-inverted --no-nfb-text-inverted --nfb-measure",
    "it is fixed now (docs/choices.md, 'Fixed settings')":
        "--lr-warmup --grad-clip --wd --wcb-hidden --nfb-text-temp --nfb-width",
    "it is part of the dataset's preset now (--preset toy: on; docs/choices.md, 'Fixed settings')":
        "--cache-images --no-cache-images --group-batches --no-group-batches",
    "the plots are always drawn now": "--plots --no-plots",
    "a run prints its settings as it starts and keeps them in args.json": "--print-settings",
}.items() for flag in flags.split()}
REMOVED_VALUES = {("--soft-label", "spread"), ("--nfb-views", "subset"), ("--nfb-views", "gain")}

def parser(description=None):
    p = ArgumentParser(description)
    add = p.add_argument
    add("--dataset", default="toy", choices=list(PRESETS), help="the benchmark; triplets: your own")
    add("--data-root", help="dataset folder, stored absolute in the run (toy: data/toy beside the "
        "code, generated on first use; triplets: the folder of train.jsonl, val.jsonl)")
    add("--train-file", help="--dataset triplets: a training file other than <data-root>/"
        "train.jsonl, e.g. an audit's clean.jsonl (image paths relative to --data-root)")
    add("--preset", choices=list(PRESETS), help="take another dataset's recipe (e.g. --dataset "
        "triplets --preset toy: the toy's tiny CLIP and schedule, without its noise)")
    add("--categories", nargs="+", default=list(data.FIQ_CATEGORIES), help="FashionIQ categories")
    add("--clip", help=f"OpenAI model name ({', '.join(available_models())}), a checkpoint path, "
        f"or a tiny config trained from scratch ({', '.join(TINY_CONFIGS)})")
    add("--encoder", default="both", choices=["both", "text"], help="what of CLIP is fine-tuned: "
        "both towers, or the text side (image tokens cached once)")
    add("--transform", choices=["clip", "targetpad"], help="image preprocessing: CLIP's resize and "
        "centre crop, or CLIP4Cir's target pad")
    add("--epochs", type=int, help="epochs to train (with --resume: extends the run)")
    add("--batch-size", type=int, help="global batch (split over the processes)")
    add("--lr", type=float, help="learning rate of CLIP's weights")
    add("--lr-wcb", type=float, help="learning rate of the WCB heads")
    add("--tau", type=float, help="temperature of the logits q·t/τ")
    add("--amp", choices=["auto", "bf16", "fp16", "none"], help="autocast, GPU only (auto)")
    add("--workers", type=int, help="DataLoader workers per process (2)")
    add("--noise", type=float, help="fraction of training triplets to corrupt in memory (the files "
        f"are never changed); default 0, the toy benchmark's {data.DATASETS['toy'].noise}")
    add("--noise-kind", default="shuffle", help=f"how: {', '.join(triplets.NOISE_KINDS)} (shuffle: "
        "the field's protocol; see triplets.inject_noise)")
    add("--oracle", action="store_true", help="the ceiling: train only on the triplets known to be "
        "clean, for the same number of steps")
    add("--skip-missing", action="store_true", help="drop triplets whose images are missing")
    # the method's switches (each one is an ablation)
    add("--no-wcb", action="store_true", help="no Weight Compensation Block (plain CLIP features)")
    add("--wcb-maps", type=int, default=2, help="K, weight maps per WCB head")
    add("--div-weight", type=float, default=0.1, help="λ of the WCB diversity penalty")
    add("--no-nfb", action="store_true", help="no Noise-pair Filter Block (InfoNCE throughout)")
    add("--warmup-epochs", type=int, help="epochs of plain InfoNCE before the first GMM")
    add("--gmm", default="sklearn", choices=["sklearn", "torch"], help="the NFB's GMM: "
        "scikit-learn's, or the same EM in torch (on the losses' device)")
    add("--soft-label", default="sample", choices=["sample", *SOFT_FORMS], help="L^soft_NCE "
        "(loss.py): sample pair i into an epoch with probability w_i; weight its l_i by w_i; or "
        "complement: a flagged pair teaches only what its query is not, -log(1 - p_ij) over the "
        "other targets, weighted by 1 - w_i (RCL)")
    add("--nfb-gate", type=float, default=0.02, help="nats per pair by which two Gaussians must "
        "beat one Gamma on the query view's losses, its noisy component 1.25x the wider, else "
        "every w = 1 (no second mode: no noise; 0: no gate)")
    add("--nfb-views", nargs="+", default=["query", "text"], choices=VIEWS, help="the views of a "
        "training pair the NFB decides on, query first (it says whether there is noise at all); a "
        "pair is flagged when any view flags it (nfb.pair_views)")
    # memory: the same gradients for less of it (docs/gpu.md)
    add("--micro-batch", type=int, metavar="N", help="the towers run on micro-batches of N, the "
        "loss on the whole batch (gradient caching): the same gradients, the towers' memory of "
        "N; ModifiedResNet's BatchNorm normalises each micro-batch (0: off)")
    add("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
        help="activation checkpointing: each residual block of the towers keeps only its input "
        "and runs again in the backward")
    # SPN
    add("--stage", type=int, default=1, choices=[1, 2], help="2: SPN static-bank stage")
    add("--init", help="checkpoint to start from (required by --stage 2)")
    add("--extra-triplets", help="generated positives (spn.py) added to training")
    # run
    add("--seed", type=int, default=0, help="model init, data order, injected noise, NFB's draws")
    add("--out", help="run folder (default runs/<dataset>-<time> in the working directory, where "
        "evaluate.py looks for the latest run)")
    add("--resume", help="run folder or last.pt to continue")
    add("--max-steps", type=int, help="stop each epoch after this many steps (debug)")
    for a in p._actions:                          # the preset-dependent defaults, said in --help
        if a.dest in REAL:
            t, r = PRESETS["toy"][a.dest], REAL[a.dest]
            a.help += f" (preset: toy {t}, real data {r})" if t != r else f" (preset: {r})"
    return p

class Settings(argparse.Namespace):
    """A run's settings: every key resolved by `settings`, then frozen (build only reads them)."""

    def freeze(self):
        self.__class__ = Frozen
        return self

class Frozen(Settings):
    def __setattr__(self, key, value):
        raise AttributeError(f"the settings are frozen (runtime.settings): {key} cannot change")

def settings(argv=None, description=None):
    """Every setting of a training run, resolved, checked and frozen before any data or model: the
    command line wins; then, for --resume, the run's own (flags newer than it: their defaults);
    then an --init checkpoint's model; then stage 2's and the dataset's presets. Paths: absolute."""
    p = parser(description)
    argv = sys.argv[1:] if argv is None else argv
    flag = None
    for arg in argv:
        flag = arg.split("=")[0] if arg.startswith("-") else flag
        if flag in REMOVED:
            p.error(f"{flag} was removed: {REMOVED[flag]}")
        if (flag, arg.split("=")[-1]) in REMOVED_VALUES:
            p.error(f"{flag} {arg.split('=')[-1]} was removed: {DROPPED}")
    a = p.parse_args(argv, namespace=Settings())
    if a.resume:
        a = resumed(a, given(p, argv), p)
    check(resolve(a), p)                 # a resumed run's settings, with what was given again, too
    if a.resume:
        finished(a)
    if data.DATASETS[a.dataset].make_root:              # generated by train.py's rank 0, not here
        a.data_root = a.data_root or str(toy.default_toy_root())
    a.out = a.out or f"runs/{a.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"  # in the working dir
    for k in PATHS:
        if getattr(a, k):
            setattr(a, k, str(Path(getattr(a, k)).expanduser().resolve()))
    if a.init and not a.resume:
        init = load_checkpoint(a.init, "--init", mmap=True)["args"]
        if init["dataset"] != a.dataset:
            p.error(f"--init {a.init} was trained on {init['dataset']}, not {a.dataset}; pass "
                    f"--dataset {init['dataset']} or a {a.dataset} checkpoint")
        for k in MODEL_KEYS:
            setattr(a, k, init.get(k, FIXED.get(k)))
    return a.freeze()

def given(p, argv):
    """{dest: value} of the flags named on the command line (defaults left out)."""
    q = parser(p.description)
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return vars(q.parse_args(argv))

def resumed(args, flags, p):
    """--resume: the run's own settings (its args.json, else last.pt's), with RESUME_FLAGS given
    again applied; any other flag given with another value than the run's is refused in one line."""
    path = Path(args.resume) / "last.pt" if Path(args.resume).is_dir() else Path(args.resume)
    if not path.is_file():
        p.error(f"--resume {args.resume}: no {path}; pass a run folder holding last.pt (or the "
                "file itself)")
    run = path.parent
    saved = json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() \
        else load_checkpoint(path, "--resume", mmap=True)["args"]
    # flags newer than the run take their defaults; the run folder, wherever it was started from
    saved = {**vars(defaults(saved["dataset"])), **saved, "out": str(run)}
    may = ", ".join("--" + f.replace("_", "-") for f in RESUME_FLAGS)
    for k, v in flags.items():
        if k not in (*RESUME_FLAGS, "resume") and not same(k, v, saved.get(k)):
            p.error(f"--resume {run}: --{k.replace('_', '-')} {v} differs from the run's "
                    f"{saved.get(k)}; a resumed run keeps its settings (only {may} may change): "
                    "leave it out, or start a new run with --out DIR")
    again = {k: flags[k] for k in RESUME_FLAGS if k in flags}
    return Settings(**{**saved, **again, "resume": str(path)})

def finished(args):
    """A resumed run that has trained its --epochs already stops here, in one line, before any data
    or model (last.pt is mapped, not read)."""
    ckpt = load_checkpoint(args.resume, "--resume", mmap=True)
    done, planned = ckpt["epoch"] + 1, ckpt["args"]["epochs"]
    if args.epochs <= done:
        more = f" with --epochs {args.epochs}" if args.epochs != planned else ""
        print(f"{Path(args.resume).parent}: the run has trained {done} epoch{'s' * (done > 1)} of "
              f"its {planned}; nothing to resume{more} (pass --epochs N > {done} to train it "
              "longer)")
        sys.exit(0)

def same(key, a, b):
    """A flag's value given again equals the run's (paths compared where they point)."""
    if key in PATHS and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b or isinstance(a, (list, tuple)) and list(a) == list(b or ())

def describe(args):
    """The settings as `key=value` lines within 100 characters (categories where per category)."""
    skip = () if data.DATASETS[args.dataset].per_category else ("categories",)
    items = " ".join(f"{k}={v}" for k, v in vars(args).items() if k not in skip)
    return "settings:\n" + textwrap.fill(items, 100, initial_indent="  ", subsequent_indent="  ",
                                          break_on_hyphens=False)

def defaults(dataset):
    """A training run's settings for a dataset with nothing given (its presets), unchecked."""
    return resolve(parser().parse_args(["--dataset", dataset], namespace=Settings()))

def resolve(args):
    """Fill what the command line left open from stage 2's and the dataset's presets (--noise: the
    dataset's own, whatever the recipe)."""
    preset = args.preset or args.dataset
    presets = dict(PRESETS[preset], noise=data.DATASETS[args.dataset].noise, **FIXED, **RUN,
                   **(STAGE2[preset] if args.stage == 2 else {}))
    for k, v in presets.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args

def check(a, p):
    """The rules a run's settings must meet; a failure is one line naming the flag and the fix."""
    world, spec = int(os.environ.get("WORLD_SIZE", 1)), data.DATASETS[a.dataset]
    per = max(1, a.batch_size // world)                                 # the batch of a process
    root = Path(a.data_root).expanduser() if a.data_root else None
    for ok, message in [
        (a.epochs >= 1, f"--epochs {a.epochs}: train at least 1 epoch"),
        (a.batch_size >= 2, f"--batch-size {a.batch_size}: contrastive training needs >= 2 pairs"),
        (a.batch_size % world == 0, f"--batch-size {a.batch_size}: not divisible by the {world} "
                                    "processes"),
        (a.tau > 0, f"--tau {a.tau}: the temperature of q·t/τ must be > 0 (0.01 for CLIP, 0.05 "
                    "on the toy)"),
        (a.lr >= 0 and a.lr_wcb >= 0, "--lr / --lr-wcb: learning rates must be >= 0"),
        (a.warmup_epochs >= 0, f"--warmup-epochs {a.warmup_epochs}: must be >= 0"),
        (a.nfb_gate >= 0, f"--nfb-gate {a.nfb_gate}: nats per pair, >= 0 (0: no gate)"),
        (a.nfb_views[0] == "query" and len(set(a.nfb_views)) == len(a.nfb_views),
         f"--nfb-views {' '.join(a.nfb_views)}: list each view once, query first (its loss says "
         "whether there is noise at all), e.g. --nfb-views query text"),
        (not a.micro_batch or 1 <= a.micro_batch <= per and per % a.micro_batch == 0,
         f"--micro-batch {a.micro_batch}: must divide the batch of each process, {per} "
         f"(--batch-size {a.batch_size} over {world}), and not exceed it; e.g. --micro-batch "
         f"{divisor_up_to(per, 32)}"),
        (not a.grad_checkpoint or a.encoder == "both" and a.stage == 1,
         f"--grad-checkpoint is for fine-tuning both towers, and "
         f"{'--stage 2' if a.stage == 2 else '--encoder text'} freezes the image tower (its "
         "outputs computed once); bound the text side's memory with --micro-batch N instead"),
        (a.wcb_maps >= 2, f"--wcb-maps {a.wcb_maps}: the WCB needs K >= 2 maps to be diverse"),
        (a.workers >= 0, f"--workers {a.workers}: must be >= 0"),
        (a.max_steps is None or a.max_steps >= 1, f"--max-steps {a.max_steps}: must be >= 1"),
        (a.stage == 1 or a.init, "--stage 2 needs --init RUN/best.pt (a stage-1 checkpoint)"),
        (not a.init or Path(a.init).is_file(),
         f"--init {a.init}: no such file; pass a run's best.pt"),
        (not a.extra_triplets or Path(a.extra_triplets).is_file(),
         f"--extra-triplets {a.extra_triplets}: no such file; write one with `python spn.py`"),
        (spec.make_root or a.data_root, f"--dataset {a.dataset} needs --data-root DIR (the dataset "
                                        "folder in its official layout, README: Data)"),
        (not root or root.is_dir() or spec.make_root and not root.exists(),
         f"--data-root {a.data_root}: "
         f"{'a file, not a folder' if root and root.exists() else 'no such folder'}; point it at "
         f"the {a.dataset} dataset folder"),
        (not a.oracle or a.noise or spec.known_noise, "--oracle trains on the triplets known to be "
         "clean, and without injected noise (--noise > 0) nothing about "
         f"{a.dataset}'s triplets is known; add --noise"),
        (not a.train_file or spec.own_rows and Path(a.train_file).expanduser().is_file(),
         f"--train-file {a.train_file}: "
         f"{'no such file' if spec.own_rows else 'only with --dataset triplets'}; pass an audit's "
         "clean.jsonl"),
        (a.init or a.clip in TINY_CONFIGS or a.clip in available_models() or Path(a.clip).is_file(),
         f"--clip {a.clip}: not a released model ({', '.join(available_models())}) nor a file")]:
        if not ok:
            p.error(message)
    try:
        triplets.check_noise(noise_of(a), has_subsets=spec.subsets)
    except ValueError as e:
        p.error(str(e))
    # stage 2 may carry stage 1's labels over (no warm-up): train.carry_over warns when it cannot
    if not a.no_nfb and a.stage == 1 and a.warmup_epochs >= a.epochs and \
            int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --warmup-epochs {a.warmup_epochs} >= --epochs {a.epochs}: every epoch "
              "is a warm-up, the noise filter's labels are never used (pass --no-nfb, or more "
              "--epochs)", file=sys.stderr)

def divisor_up_to(n, cap):
    """The largest divisor of n that is at most cap (a --micro-batch to suggest), or None."""
    return max((d for d in range(1, min(cap, n) + 1) if n % d == 0), default=None)

def noise_of(args):
    return triplets.Noise(args.noise, args.noise_kind, args.seed)

def triplet_changes(a, b):
    """The settings (dicts) by which two runs' training triplets differ (TRIPLETS); [] if none."""
    return [k for k in TRIPLETS if a.get(k) != b.get(k)]

# -----------------------------------------------------------------------------
# distributed helpers: the same script runs with one process or under torchrun

def setup_distributed():
    """(rank, world, device): one process, or torchrun's (NCCL on GPUs, Gloo on CPUs)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not torch.cuda.is_available():
        dist.init_process_group("gloo")
        return rank, world, torch.device("cpu")
    if local >= (gpus := torch.cuda.device_count()):
        sys.exit(f"error: torchrun started process {local} of a node, and this machine has {gpus} "
                 f"GPU(s): pass --nproc_per_node {gpus} (or CUDA_VISIBLE_DEVICES= to train on the "
                 "CPUs with gloo)")
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    return rank, world, torch.device("cuda", local)

class _AllGather(torch.autograd.Function):
    """Forward: every rank's (B, D) rows concatenated in rank order. Backward: every rank's loss
    depends on every row, so a row's gradient is the sum over ranks of those it received
    (all_reduce); each rank keeps its own rows' slice. DDP then averages the parameter gradients."""

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
    """x (B, D) -> (W·B, D): all ranks' rows in rank order (every B equal: drop_last), gradients
    flowing back to the rank that made them: every query sees the global batch's targets."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)

def gather_rows(x, n):
    """Every rank's contiguous share of n rows (x: this rank's, torch.tensor_split's sizes) -> all
    n rows, in order, on every rank. One process: x itself."""
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
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy(), *s["numpy"][2:]))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])  # this process's GPU (the count may differ)

def load_checkpoint(path, flag="--checkpoint", mmap=False):
    """A run's checkpoint (best.pt / last.pt), loaded weights_only; clear errors, no tracebacks.
    mmap: tensors mapped, not read (a look at the settings and epoch costs next to nothing)."""
    path = Path(path)
    if not path.is_file():
        name = "last" if flag == "--resume" else "best"
        raise SystemExit(f"error: checkpoint {path} not found (train one with `python train.py`, "
                         f"then pass {flag} runs/<run>/{name}.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); it may "
                         "be truncated or corrupt: use the run's other file (best.pt / last.pt) or "
                         "retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of this project (expected a dict with "
                         "'model' and 'args', as train.py writes; for OpenAI CLIP weights use "
                         f"--clip {path})")
    return ckpt

def build_model(ckpt):
    """CIRModel from a checkpoint: CLIP's architecture is inferred from the weights' shapes."""
    a = ckpt["args"]
    clip = build_clip({k[5:]: v for k, v in ckpt["model"].items() if k.startswith("clip.")})
    model = CIRModel(clip, wcb=not a["no_wcb"], n_maps=a["wcb_maps"], wcb_hidden=a["wcb_hidden"])
    model.load_state_dict(ckpt["model"])
    return model

def load_model(checkpoint=None, clip=None, dataset=None, device="cpu"):
    """The model of evaluate, search, audit and spn: a run's checkpoint (default: the most recent
    run's best.pt under runs/) or a released CLIP zero-shot (sum fusion, no WCB); dataset: the
    command's, checked against the run's. -> (model on device in eval mode, the run's settings,
    the checkpoint, its path); zero-shot: ({}, None, the CLIP's name)."""
    if clip and checkpoint:
        raise SystemExit("error: --clip (zero-shot CLIP) and --checkpoint (a trained run) name two "
                         "models; pass one")
    if clip:
        model = CIRModel(load_clip(clip, device="cpu")[0], wcb=False)
        return model.to(device).eval(), {}, None, clip
    path = Path(checkpoint) if checkpoint else latest_best()
    ckpt = load_checkpoint(path)
    trained = ckpt["args"]["dataset"]
    if dataset and dataset != trained:
        raise SystemExit(f"error: {path} was trained on {trained}, not {dataset}; pass --dataset "
                         f"{trained} or a {dataset} checkpoint")
    return build_model(ckpt).to(device).eval(), ckpt["args"], ckpt, path

def model_flags(p):
    """The flags by which evaluate.py and audit.py name a model (load_model) and its data."""
    p.add_argument("--checkpoint", help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", help="zero-shot: OpenAI CLIP name or path, sum fusion")
    p.add_argument("--dataset", choices=list(data.DATASETS))
    p.add_argument("--data-root")
    p.add_argument("--categories", nargs="+")

def latest_best(runs="runs"):
    """The best.pt of the most recent run under runs/ (in the working directory)."""
    found = sorted(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"error: no run with a best.pt under {Path(runs).resolve()}; train one "
                         "with `python train.py` or pass --checkpoint / --clip")
    print(f"using {found[-1]} (the most recent run)")
    return found[-1]

# -----------------------------------------------------------------------------
# precision

def autocast(amp, device):
    """--amp on this device -> (autocast context, GradScaler). GPU: bf16 where supported, else fp16
    with a gradient scaler; CPU or --amp none: full precision, the scaler disabled (calls pass)."""
    if device.type != "cuda" or amp == "none":
        return nullcontext(), torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.float16 if amp == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return torch.autocast("cuda", dtype=dtype), scaler
