"""Benchmarks behind the README's speed tables. Each prints a small table; ratios are measured in
one run. Speed is checked here, never in the tests. Numbers depend on the machine: the README names
the one it used.

    python -m tools.bench WHAT

    clip       our CLIP vs OpenAI's reference code, same random weights (CPU fp32)
    data       toy generation, loader throughput (0 / 2 workers), building the val datasets
    method     GMM fit (scikit-learn vs torch EM), soft NCE vs InfoNCE, bank NCE
    train      a toy training step split into data / forward / backward, its FLOP/s against the
               machine's fp32 matmul peak, the NFB's share of an epoch, cached vs uncached image
               tokens (--encoder text), the time --micro-batch and --grad-checkpoint cost
    retrieval  ranking CIRR's val queries against galleries of 2,297 to 100k images
    all        everything (about 10 minutes on 2 cores)
"""

import argparse
import dataclasses
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import data
import model as M
import preprocess as TK
import runtime
import toy
import train
from encode import ImageSource
from tools.memory import ARCHS

# The real annotation files: the full ones where NCLCIR_ANNOTATIONS names their folder, else the
# excerpts in testdata/
ANNOTATIONS = Path(os.environ.get("NCLCIR_ANNOTATIONS")
                   or Path(__file__).resolve().parent.parent / "testdata")

def _time(fn, reps=1):
    """Mean seconds of fn() over reps calls, after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps

def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out

def _table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, *rows]:
        print("  ".join(f"{str(x):>{w}}" for x, w in zip(r, widths)))

# -----------------------------------------------------------------------------
# clip: ours vs OpenAI's reference (targets: ours / reference <= 1.0 for images, <= 0.35 for text)

def reference_clip():
    """OpenAI's `clip` package (clip-anytorch). Its __init__ imports pkg_resources only for a
    version check, and recent setuptools no longer ships pkg_resources: a stand-in takes its place
    for that import only."""
    shim = "pkg_resources" not in sys.modules
    if shim:
        try:
            __import__("pkg_resources")
            shim = False
        except ImportError:
            import packaging.version
            sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    try:
        import clip
    finally:
        if shim:
            del sys.modules["pkg_resources"]
    return clip

def bench_clip(args):
    threads, reps, batch = args.threads, args.reps, args.batch
    torch.set_num_threads(threads)
    clip = reference_clip()
    captions = json.loads((ANNOTATIONS / "cirr/captions/cap.rc2.val.json").read_text())
    caps = [t["caption"] for t in captions]
    text = TK.tokenize(random.Random(0).sample(caps, batch))                 # (B, 77)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"CLIP forward, CPU fp32, {threads} threads, batch {batch} at 224 px, median of {reps} "
          f"interleaved runs; text trimmed to {int(text.argmax(-1).max()) + 1} of 77 tokens (other "
          "workers may share the CPU)")
    print(f"{'model':10s} {'part':6s} {'reference s':>12s} {'ours s':>8s} {'ours/ref':>9s} "
          f"{'max |diff|':>11s}")
    for name, cfg in ((n, ARCHS[n]) for n in ("ViT-B/32", "RN50")):
        torch.manual_seed(0)
        ref = clip.model.CLIP(**cfg).eval()
        ours = M.build_clip(ref.state_dict())
        for part, ref_fn, our_fn, x in [("images", ref.encode_image, ours.encode_image, images),
                                        ("text", ref.encode_text, ours.encode_text, text)]:
            t_ref, t_ours = [], []
            with torch.no_grad():
                ref_fn(x), our_fn(x)                                       # warm-up
                for _ in range(reps):
                    t, a = _timed(ref_fn, x)
                    t_ref.append(t)
                    t, b = _timed(our_fn, x)
                    t_ours.append(t)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name} {part}: outputs differ"
            r, o = statistics.median(t_ref), statistics.median(t_ours)
            diff = (a - b).abs().max().item()
            print(f"{name:10s} {part:6s} {r:12.4f} {o:8.4f} {o / r:9.3f} {diff:11.2e}")

# -----------------------------------------------------------------------------
# data: toy generation, loader throughput, building the real val datasets

def _placeholders(root, rels, png):
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.link(png, p)

def bench_data(args):
    torch.set_num_threads(1)
    batch, batches = 128, 20
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []
    try:
        t = time.perf_counter()
        root = toy.make_toy(tmp / "toy")                                  # the default sizes
        n_img = sum(1 for _ in root.rglob("*.png"))
        rows.append((f"toy generation (default sizes, {n_img:,} images)",
                     f"{time.perf_counter() - t:.1f} s"))
        ds = data.CIRR(root, "train")
        images = ImageSource.files(ds, TK.make_transform("clip", toy.TOY_IMAGE_SIZE))
        for workers in (0, 2):
            it = iter(DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                 drop_last=True, generator=torch.Generator().manual_seed(0),
                                 collate_fn=functools.partial(train.collate, images=images)))
            next(it)                                          # workers started: not counted
            t, n = time.perf_counter(), 0
            for _ in range(batches):
                _, ref, tgt, _ = next(it)
                n += len(ref) + len(tgt)
            dt = time.perf_counter() - t
            rows.append((f"toy train loader, {workers} workers, batch {batch}",
                         f"{n / dt:,.0f} images/s"))
            del it
        png = tmp / "tiny.png"
        Image.new("RGB", (4, 4)).save(png)
        cirr = tmp / "cirr"
        shutil.copytree(ANNOTATIONS / "cirr", cirr)
        rel = json.loads((cirr / "image_splits/split.rc2.val.json").read_text()).values()
        _placeholders(cirr / "img_raw", rel, png)
        t = time.perf_counter()
        ds = data.CIRR(cirr, "val")
        rows.append((f"build CIRR val ({len(ds):,} triplets, {len(ds.images):,} images)",
                     f"{(time.perf_counter() - t) * 1e3:.0f} ms"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _table("data (1 thread for the main process)", ("what", "result"), rows)

# -----------------------------------------------------------------------------
# method: the NFB's GMM and the losses

def bench_method(args):
    from loss import info_nce, soft_nce
    from nfb import fit_gmm, minmax
    rows = []
    for n in (30_000, 1_000_000):
        g = torch.Generator().manual_seed(0)
        noisy = torch.rand(n, generator=g) < 0.3
        losses = torch.where(noisy, 3 + torch.randn(n, generator=g),
                             (torch.randn(n, generator=g) * 0.6).abs())
        x = minmax(losses)
        reps = 3 if n < 100_000 else 1
        ts = _time(lambda: fit_gmm(x, "sklearn"), reps)
        tt = _time(lambda: fit_gmm(x, "torch"), reps)
        dw = (fit_gmm(x, "sklearn")["clean"] - fit_gmm(x, "torch")["clean"]).abs().max().item()
        rows.append((f"{n:,}", f"{ts:.3f}", f"{tt:.3f}", f"{tt / ts:.2f}", f"{dw:.1e}"))
    _table("NFB: 2-component GMM fit on min-max normalised losses (30% noisy)",
           ("losses", "sklearn s", "torch EM s", "torch/sklearn", "max |Δw|"), rows)
    rows = []
    for B in (256, 1024):
        q = F.normalize(torch.randn(B, 640), dim=-1).requires_grad_()
        t = F.normalize(torch.randn(B, 640), dim=-1).requires_grad_()
        w = torch.rand(B)
        ti = _time(lambda: info_nce(q, t, 0.01).backward(), 10)
        tsft = _time(lambda: soft_nce(q, t, w, 0.01).backward(), 10)
        rows.append((B, f"{ti * 1e3:.2f}", f"{tsft * 1e3:.2f}", f"{tsft / ti:.2f}"))
    _table("losses, forward + backward, in-batch, D = 640",
           ("B", "InfoNCE ms", "soft NCE ms", "soft/InfoNCE"), rows)
    q = F.normalize(torch.randn(256, 640), dim=-1).requires_grad_()
    bank = F.normalize(torch.randn(30_000, 640), dim=-1)
    idx, w = torch.randint(0, 30_000, (256,)), torch.rand(256)
    th = _time(lambda: info_nce(q, bank, 0.02, pos=idx).backward(), 3)
    tsb = _time(lambda: soft_nce(q, bank, w, 0.02, pos=idx).backward(), 3)
    _table("SPN stage 2: bank NCE, B = 256 over a 30k x 640 bank", ("labels", "ms"),
           [("hard", f"{th * 1e3:.1f}"), ("soft", f"{tsb * 1e3:.1f}")])

# -----------------------------------------------------------------------------
# train: where a toy step's time goes, the NFB's share of an epoch, cached image tokens

def matmul_peak():
    """This machine's fp32 matrix-product rate, FLOP/s: the best of a few square products (1024 to
    2048), measured now with the threads the training step gets, so the step's share of it is a
    ratio within one run."""
    best = 0.0
    for n in (1024, 1536, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = max(best, 2 * n ** 3 / _time(lambda: a @ b, 5))
    return best

def bench_train(args):
    import evaluate
    from nfb import VIEWS, NoiseFilter
    from torch.utils.flop_counter import FlopCounterMode
    steps = args.steps
    out = tempfile.mkdtemp(prefix="bench_train_")
    run = train.build(runtime.settings(["--out", out, "--max-steps", str(steps), "--no-nfb"]))
    a, n_steps = run.args, len(run.train) // run.args.batch_size
    # FLOPs of one step (matrix products: forward and backward), counted on a real batch
    batch = train.on_device(run, next(iter(train.make_loader(run, 0))))
    with FlopCounterMode(display=False) as fc:
        train.train_step(run, batch, None)
    flops = fc.get_total_flops()
    peak = matmul_peak()
    train.train_epoch(run, 0)                                                      # warm-up
    t = time.perf_counter()
    rec = train.train_epoch(run, 1)
    step = (time.perf_counter() - t) / steps
    rows = [(k[5:], f"{rec[k] / steps:.3f}", f"{100 * rec[k] / steps / step:.0f}%")
            for k in ("time_data", "time_step")]
    _table(f"toy training step (batch {a.batch_size}, {a.clip} CLIP, {torch.get_num_threads()} "
           f"threads, images decoded once, mean of {steps} steps)", ("part", "s/step", "share"),
           rows + [("total", f"{step:.3f}", "100%")])
    achieved = flops / step
    _table("the step's arithmetic against this machine's fp32 matmul peak (both measured now)",
           ("GFLOP / step", "achieved GFLOP/s", "matmul peak GFLOP/s", "share of peak"),
           [(f"{flops / 1e9:.1f}", f"{achieved / 1e9:.0f}", f"{peak / 1e9:.0f}",
             f"{100 * achieved / peak:.0f}%")])
    # a group batch repeats its reference: the tower sees each distinct image once (model.distinct)
    share, M.distinct = M.distinct, lambda x: (x, None)
    t = time.perf_counter()
    train.train_epoch(run, 2)
    every = (time.perf_counter() - t) / steps
    M.distinct = share
    # AdamW over the step's gradients: the per-tensor loop, foreach, one fused kernel (train.py's)
    params = [p for g in run.opt.param_groups for p in g["params"]]
    adam = {kind: _time(torch.optim.AdamW(params, **{kind: True} if kind else {}).step, 5)
            for kind in ("", "foreach", "fused")}
    loop, foreach = step - adam["fused"] + adam[""], step - adam["fused"] + adam["foreach"]
    _table("what makes the step fast (same run)", ("variant", "s/step", "vs this code"),
           [("this code: each distinct image once, fused AdamW", f"{step:.3f}", "1.00x"),
            ("every image of the batch through the tower", f"{every:.3f}", f"{every / step:.2f}x"),
            ("AdamW as a per-tensor loop instead of fused", f"{loop:.3f}", f"{loop / step:.2f}x"),
            ("AdamW foreach instead of fused", f"{foreach:.3f}", f"{foreach / step:.2f}x")])
    # the NFB's share of an epoch: the views after the epoch (a no-grad pass over every training
    # image and the distinct texts, then the views' matrix products) and a GMM per view
    t_val = _time(lambda: evaluate.evaluate_sets(run.enc, run.val, a.dataset))
    epoch = step * n_steps + t_val
    rows = []
    for views in (["query"], ["query", "text"], list(VIEWS)):
        # the settings are frozen: the views go in through a copy
        settings = argparse.Namespace(**{**vars(a), "nfb_views": views})
        viewed = dataclasses.replace(run, args=settings)
        nfb = NoiseFilter(len(run.train), 0, a.gmm, gate=a.nfb_gate, views=views)
        t_nfb = _time(lambda: nfb.update(train.noise_views(viewed), 1))
        rows.append((" + ".join(views), f"{t_nfb:.1f}", f"{100 * t_nfb / epoch:.1f}%"))
    _table(f"NFB per epoch ({n_steps} steps + validation = {epoch:.0f} s)",
           ("--nfb-views", "NFB s", "share of epoch"), rows)
    # --encoder text: the image tower frozen and its tokens computed once, against fine-tuning both
    t = time.perf_counter()
    run = train.build(runtime.settings(["--out", out, "--max-steps", str(steps), "--no-nfb",
                                        "--encoder", "text"]))
    t_build = time.perf_counter() - t
    train.train_epoch(run, 0)
    t = time.perf_counter()
    train.train_epoch(run, 1)
    text = (time.perf_counter() - t) / steps
    _table(f"--encoder text, s/step (its setup, decoding the images and caching their tokens: "
           f"{t_build:.1f} s)", ("fine-tuned", "s/step", "speed-up"),
           [("both towers (--encoder both)", f"{step:.3f}", "1.0x"),
            ("text side, image tokens cached (--encoder text)", f"{text:.3f}",
             f"{step / text:.1f}x")])

    # --micro-batch and --grad-checkpoint: what their memory costs in time, timed in turns against
    # the whole batch of the same size
    B = a.batch_size                                 # the toy's 128, and 4 times that
    for batch, variants in ((B, [f"--micro-batch {B // 2}", f"--micro-batch {B // 4}",
                                 f"--micro-batch {B // 8}", "--grad-checkpoint",
                                 f"--micro-batch {B // 4} --grad-checkpoint"]),
                            (4 * B, [f"--micro-batch {B}", f"--micro-batch {B // 2}"])):
        runs = {k: train.build(runtime.settings(["--out", out, "--max-steps", str(steps),
                                                 "--no-nfb", "--batch-size", str(batch),
                                                 *k.split()]))
                for k in ["", *variants]}
        times = {k: [] for k in runs}
        for epoch in range(3):                       # the first is a warm-up
            for k, r in runs.items():
                t = time.perf_counter()
                train.train_epoch(r, epoch)
                times[k].append((time.perf_counter() - t) / steps)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        _table(f"memory for time: s/step at batch {batch} (median of 2 epochs of {steps} steps, "
               "timed in turns)", ("variant", "s/step", "vs whole batch"),
               [(k or "whole batch", f"{v:.3f}", f"{v / med['']:.2f}x") for k, v in med.items()])

# -----------------------------------------------------------------------------
# retrieval: chunked ranking

def bench_retrieval(args):
    """CIRR's val queries (4,181, with reference removal and subsets) against galleries from CIRR
    val's 2,297 images to 100k: the time should grow linearly with the gallery (chunked matrix
    products, O(chunk x gallery) memory)."""
    import evaluate
    rows, base = [], None
    Q = 4181
    for G in (2297, 10_000, 30_000, 100_000):
        g = torch.Generator().manual_seed(0)
        q, gal = torch.randn(Q, 640, generator=g), torch.randn(G, 640, generator=g)
        names = [f"im{i}" for i in range(G)]
        # reference, target, 4 more
        subsets = [torch.randperm(G, generator=g)[:6].tolist() for _ in range(Q)]
        refs, tgts = [names[s[0]] for s in subsets], [names[s[1]] for s in subsets]
        members = [[names[i] for i in s] for s in subsets]
        t = _time(lambda: evaluate.cirr_metrics(q, gal, names, refs, tgts, members))
        base = base or (t, G)
        rows.append((f"{Q:,} x {G:,}", f"{t:.2f}", f"{Q * G / t / 1e6:.0f}", f"{G / base[1]:.1f}x",
                     f"{t / base[0]:.1f}x"))
    _table("retrieval: CIRR protocol (reference removed, subsets), D = 640, fp32, chunks of 1024 "
           "queries", ("queries x gallery", "s", "M pairs/s", "gallery", "time"), rows)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all",
                   choices=["clip", "data", "method", "train", "retrieval", "all"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="clip: interleaved repetitions (median)")
    p.add_argument("--batch", type=int, default=16, help="clip: batch size")
    p.add_argument("--steps", type=int, default=8, help="train: steps timed")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads")
    names = ["clip", "data", "method", "train", "retrieval"]
    for name in (names if a.what == "all" else [a.what]):
        globals()[f"bench_{name}"](a)
        torch.set_num_threads(a.threads)
