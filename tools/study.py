"""The toy benchmark's noise-robustness study: noise x method x seed, one training run per cell.

    python -m tools.study                          # the grid (docs/results.md): < 1 h on 2 cores
    python -m tools.study --report runs/study      # only the tables and plots of the finished cells
    python -m tools.study --noise 0 0.4 --methods ncl ncl+spn ncl+pos ncl+pos+spn --seeds 0  # SPN

Noise settings: a number is that fraction of training triplets corrupted with the field's shuffle
protocol (TME, CVPR 2025: references, texts or targets permuted among the chosen triplets);
`kind:ratio` picks another kind of triplets.inject_noise, e.g. `partial:0.4` (40% near-miss
targets from the query's own group).

Methods (each is train.py with some flags; README: "What follows the paper"):
    infonce       CLIP4Cir's sum baseline: no WCB, no NFB
    wcb           the control: NCL-CIR without its noise filter (--no-nfb)
    ncl           NCL-CIR with train.py's default noise filter (--nfb-views query text)
    oracle        the ceiling: the control trained on the clean triplets only, as many steps
    ncl-*, ncl+*  ablations: one NFB choice changed, or a view added (ABLATIONS)
    ncl+spn       ncl, then SPN stage 2 (static bank of all training images) from its best.pt
    ncl+pos       ncl trained with SPN's positives (ranked by the `ncl` cell's model)
    ncl+pos+spn   ncl+pos, then SPN stage 2

The grid: the core methods at every noise setting with 3 seeds, each ablation where its choice
matters (ABLATIONS) with one (--ablation-seeds). Cells run two at a time (--jobs), one core each:
on 2 cores that trains more per hour than one cell with two threads, whose small kernels wait on
each other. The seed sets the injected noise, the initialisation and the data order. The oracle
at 0% noise is the control itself (nothing to remove): it is not trained again.

A cell's metrics are the validation metrics of its *last* epoch (no checkpoint selection on the
reported split; stage 2 and the positives start from the stage-1 cell's best.pt, chosen on val as
SPN does), appended to <out>/results.jsonl as soon as the cell ends, with its R@1 per epoch and
the pairs its noise filter flags (by edit type): a killed study resumes where it stopped. The
report is markdown tables (mean ± std over the seeds) and plots.
"""

import contextlib
import itertools
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import triplets  # noqa: E402
import runtime  # noqa: E402
import util
import spn  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402

NFB_OFF = ["--no-nfb"]
TEXT = ["--nfb-views", "query", "text"]
METHODS = {"infonce": ["--no-wcb", *NFB_OFF], "wcb": NFB_OFF, "ncl": [],
           "oracle": [*NFB_OFF, "--oracle"],
           # ablations: one choice of the noise filter changed (README: "What follows the paper")
           "ncl-query": ["--nfb-views", "query"], "ncl+change": [*TEXT, "change"],
           "ncl-weight": ["--soft-label", "weight"], "ncl-comp": ["--soft-label", "complement"],
           "ncl-nogate": ["--nfb-gate", "0"],
           "ncl+spn": [], "ncl+pos": [], "ncl+pos+spn": []}
CORE = ["wcb", "ncl", "oracle"]
# each ablation where its choice matters, with the seeds of --ablation-seeds: the loss form where
# the filter acts, complement (a flagged pair learns what its query is not, every pair once an
# epoch) and weight (every pair once, a flagged one silent) against the default's sample
ABLATIONS = {"ncl-comp": ["0.2", "0.5", "0.8", "partial:0.4"], "ncl-weight": ["0.8"]}
NOISE = ["0", "0.2", "0.5", "0.8", "partial:0.4"]
METRICS = ("R@1", "R@5", "R@10", "Rsubset@1")
EDITS = ("color", "size", "shape", "add", "remove", "move")

def parse_noise(s):
    """'0.2' -> ('shuffle', 0.2); 'partial:0.4' -> ('partial', 0.4)."""
    kind, _, ratio = s.rpartition(":")
    kind = kind or "shuffle"
    triplets.check_noise(triplets.Noise(float(ratio), kind))
    return kind, float(ratio)

def noise_label(kind, ratio):
    return f"{ratio:.0%}" + ("" if kind == "shuffle" else f" {kind}")

def cell_name(method, kind, ratio, seed):
    return f"{method.replace('+', '_')}-{'' if kind == 'shuffle' else kind}n{ratio:g}-s{seed}"

# -----------------------------------------------------------------------------
# one cell

def run_cell(method, kind, ratio, seed, a, out):
    """Train one cell (first the cells it builds on, if missing) -> its log, one record an epoch."""
    common = ["--dataset", "toy", "--data-root", str(a.data_root), "--noise", str(ratio),
              "--noise-kind", kind, "--seed", str(seed), "--workers", str(a.workers)]
    stage1 = common + ["--clip", a.clip, "--epochs", str(a.epochs),
                       "--batch-size", str(a.batch_size)]
    run = out / cell_name(method, kind, ratio, seed)
    if method.endswith("+spn"):                       # SPN stage 2 on top of the stage-1 cell
        base = out / cell_name(method[:-4], kind, ratio, seed)
        if not (base / "best.pt").is_file():
            run_cell(method[:-4], kind, ratio, seed, a, out)
        extra = ["--extra-triplets", str(base / "positives.json")] if "+pos" in method else []
        argv = common + ["--stage", "2", "--init", str(base / "best.pt"),
                         "--epochs", str(a.stage2_epochs), *extra]
    elif method == "ncl+pos":                         # positives ranked by the ncl cell's model
        src = out / cell_name("ncl", kind, ratio, seed)
        if not (src / "best.pt").is_file():
            run_cell("ncl", kind, ratio, seed, a, out)
        run.mkdir(parents=True, exist_ok=True)
        positives = run / "positives.json"
        if not positives.is_file():                   # a finished cell keeps the file it trained on
            spn.main(["--dataset", "toy", "--data-root", str(a.data_root),
                      "--checkpoint", str(src / "best.pt"), "--out", str(positives),
                      "--seed", str(seed), "--workers", str(a.workers)])
        argv = stage1 + ["--extra-triplets", str(positives)]
    else:
        argv = stage1 + METHODS[method]
    epochs = runtime.settings(argv).epochs
    log = run / "log.jsonl"
    if not log.is_file() or len(log.read_text().splitlines()) < epochs:   # new, or killed: resume
        resume = ["--resume", str(run)] if (run / "last.pt").is_file() else []
        train.main(argv + ["--out", str(run)] + resume)
    return [json.loads(line) for line in log.read_text().splitlines()]

def flags(run):
    """Which training pairs the cell's noise filter flags (w < 0.5 after the last epoch): % of the
    clean pairs, of the clean pairs of each edit type, of the injected noisy pairs. None without a
    noise filter."""
    if not (run / "last.pt").is_file():
        return None
    nfb = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["nfb"]
    if nfb is None:
        return None
    a = json.loads((run / "args.json").read_text())
    noise = triplets.Noise(a["noise"], a["noise_kind"], a["seed"])
    ds = data.CIRR(a["data_root"], "train", noise=noise)
    flagged, noisy = (nfb["weights"] < 0.5)[:len(ds)], ds.noisy
    edits = [toy.edit_type(t["text"]) for t in ds.triplets]
    pct = lambda sel: 100 * flagged[sel].float().mean().item() if sel.any() else None
    out = dict(clean=pct(~noisy), noisy=pct(noisy))
    out.update({e: pct(~noisy & torch.tensor([k == e for k in edits])) for e in EDITS})
    return out

def views(last):
    """Detection after the last epoch: the decision (combined) and each view of the run's
    --nfb-views on its own -> {name: {auc, field: % flagged of the clean pairs and of each
    corrupted field}}; the combined entry's auc is that of 1 - w."""
    own = [(k[len("nfb_view_"):-len("_loss_auc")], k[:-len("loss_auc")], k) for k in last
           if k.startswith("nfb_view_") and k.endswith("_loss_auc")]
    out = {}
    for name, prefix, auc in [("combined", "nfb_", "nfb_auc"), *own]:
        by = last.get(prefix + "flagged_by_field") or []
        fields = {f: by[k] for k, f in enumerate(triplets.NOISE_FIELDS) if k < len(by)}
        out[name] = dict(auc=last.get(auc), **fields)
    return out or None

# -----------------------------------------------------------------------------
# the report

def fmt(xs, digits=1):
    """'mean ± std' over the seeds (sample std), '—' for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    std = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.{digits}f}" + std

def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None

def _cells(rows):
    """{(method, kind, ratio): [its seeds' rows]}; the oracle at 0% noise is the control's cell."""
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["kind"], r["ratio"]), []).append(r)
    for (m, k, ratio), rs in list(cells.items()):
        if m == "wcb" and ratio == 0 and ("oracle", k, 0) not in cells:
            cells[("oracle", k, 0)] = rs
    return cells

def _order(key):
    method, kind, ratio = key
    # a method since removed (an older results.jsonl) sorts last
    rank = list(METHODS).index(method) if method in METHODS else len(METHODS)
    return kind != "shuffle", ratio, rank

def tables(cells):
    head = " | ".join(METRICS) + " | NFB AUC | clean flagged % | noisy flagged % |"
    lines = ["| noise | method | seeds | " + head, "|---|---|---|" + "---|" * (len(METRICS) + 3)]
    for key in sorted(cells, key=_order):
        rs = cells[key]
        fs = [r.get("flags") or {} for r in rs]
        vals = [fmt([r["metrics"][m] for r in rs]) for m in METRICS]
        det = [fmt([r.get("nfb_auc") for r in rs], 3), fmt([f.get("clean") for f in fs]),
               fmt([f.get("noisy") for f in fs])]
        lines.append(f"| {noise_label(*key[1:])} | {key[0]} | {len(rs)} | "
                     + " | ".join(vals + det) + " |")
    out = ["\n".join(lines)]
    # read against the control and the ceiling: the share of the control -> oracle gap closed
    gap = ["| noise | control (wcb) | oracle | ncl | gap closed by ncl | ablations: gap closed |",
           "|---|---|---|---|---|---|"]
    for kind, ratio in sorted({k[1:] for k in cells}, key=lambda kr: (kr[0] != "shuffle", kr[1])):
        r1 = {m: mean([r["metrics"]["R@1"] for r in cells.get((m, kind, ratio), [])])
              for m in METHODS}
        c, o = r1["wcb"], r1["oracle"]
        if c is None or o is None or r1["ncl"] is None:
            continue

        def closed(m):
            return f"{100 * (r1[m] - c) / (o - c):.0f}%" if o - c > 1 else f"{r1[m] - c:+.1f} R@1"

        abl = ", ".join(f"{m} {closed(m)}" for m in ABLATIONS if r1[m] is not None)
        gap.append(f"| {noise_label(kind, ratio)} | {c:.1f} | {o:.1f} | {r1['ncl']:.1f} | "
                   f"{closed('ncl')} | {abl} |")
    out.append("R@1 read against the control and the ceiling (gap closed = (method - control) / "
               "(oracle - control); where the oracle is within 1 point of the control, the "
               "difference in R@1 instead)\n\n" + "\n".join(gap))
    det = ["| noise | method | view | AUC | clean | reference | text | target |",
           "|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=_order):
        vs = [r["views"] for r in cells[key] if r.get("views")]
        if not vs or key[0] != "ncl" and key[0] not in ABLATIONS:
            continue
        for name in vs[0]:
            vals = [fmt([v[name].get("auc") for v in vs if name in v], 3)] + [
                fmt([v[name].get(f) for v in vs if name in v]) for f in triplets.NOISE_FIELDS]
            det.append(f"| {noise_label(*key[1:])} | {key[0]} | {name} | "
                       + " | ".join(vals) + " |")
    if len(det) > 2:
        out.append("Detection after the last epoch: the decision (combined: a pair is flagged "
                   "when any view of the run's --nfb-views flags it) and each of those views on "
                   "its own (its GMM and gate). AUC of the view's loss against the injected "
                   "noise; % of the clean pairs and of each corrupted field flagged (w < 0.5)"
                   "\n\n" + "\n".join(det))
    edit = ["| noise | method | " + " | ".join(EDITS) + " | all clean | injected noisy |",
            "|---|---|" + "---|" * 8]
    for key in sorted(cells, key=_order):
        fs = [r["flags"] for r in cells[key] if r.get("flags")]
        if fs:
            vals = [fmt([f[e] for f in fs]) for e in (*EDITS, "clean", "noisy")]
            edit.append(f"| {noise_label(*key[1:])} | {key[0]} | " + " | ".join(vals) + " |")
    if len(edit) > 2:
        out.append("% of training pairs the noise filter flags (w < 0.5) after the last epoch: the "
                   "clean pairs by edit type, all clean pairs, the injected noisy pairs\n\n"
                   + "\n".join(edit))
    return "\n\n".join(out)

def plots(cells, out, title):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    present = [m for m in METHODS if any(k[0] == m for k in cells)]   # one colour a method
    r1 = lambda rs: [c["metrics"]["R@1"] for c in rs]
    for i, method in enumerate(present):
        pts = sorted((r, r1(rs)) for (m, k, r), rs in cells.items()
                     if m == method and k == "shuffle")
        part = [r1(rs) for (m, k, r), rs in cells.items() if m == method and k == "partial"]
        style = dict(marker="o", capsize=3, color=f"C{i}", ls="--" if method in ABLATIONS else "-")
        if pts:
            ax.errorbar([100 * r for r, _ in pts], [statistics.mean(v) for _, v in pts],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                        label=method, **style)
        if part:
            ax.errorbar([103 + i], [statistics.mean(part[0])], marker="s", color=f"C{i}", capsize=3,
                        yerr=[statistics.stdev(part[0]) if len(part[0]) > 1 else 0])
    ax.set_xlabel("shuffle noise (% of training triplets); squares at the right: 40% partial "
                  "(near-miss) noise")
    ax.set_ylabel("R@1, toy val, last epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for i, method in enumerate(present):
        rs = cells.get((method, "shuffle", 0.5))
        if not rs or method not in ("infonce", "wcb", "ncl", "oracle"):
            continue
        curves = [r["curve"] for r in rs]
        n = min(map(len, curves))
        ax.plot(range(1, n + 1), [statistics.mean(c[e] for c in curves) for e in range(n)],
                marker="o", color=f"C{i}", label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("R@1, toy val (mean of the seeds)")
    ax.set_title("50% shuffle noise, per epoch (epoch 1: the warm-up, plain InfoNCE)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)

def report(out):
    """Markdown tables and the plot from <out>/results.jsonl."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = _cells(rows)
    text = tables(cells)
    (out / "results.md").write_text(text + "\n")
    study = out / "study.json"
    settings = json.loads(study.read_text()) if study.is_file() else {}
    plots(cells, out, f"noise robustness on the toy benchmark, {settings}")
    print(text)
    minutes = sum(r.get("minutes", 0) for r in rows)
    print(f"\n{len(rows)} cells, {minutes:.0f} min of training; written: {out / 'results.md'}, "
          f"{out / 'study.png'}")

# -----------------------------------------------------------------------------
# the grid

def _worker(threads):
    torch.set_num_threads(threads)

def _cell(job):
    """Train one cell, its console output into its run folder -> its results.jsonl line."""
    (method, kind, ratio, seed), a, out = job
    run = out / cell_name(method, kind, ratio, seed)
    run.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(run / "console.txt", "a") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        history = run_cell(method, kind, ratio, seed, a, out)
    last = history[-1]
    return dict(method=method, kind=kind, ratio=ratio, seed=seed, metrics=last["metrics"],
                epoch=last["epoch"], curve=[r["metrics"]["R@1"] for r in history],
                nfb_auc=last.get("nfb_auc"), flags=flags(run), views=views(last),
                minutes=round((time.perf_counter() - t) / 60, 2))

def grid(a):
    """[(method, kind, ratio, seed)] in running order: every method of a noise setting first."""
    cells = []
    for setting in a.noise:
        kind, ratio = parse_noise(setting)
        for method in a.methods:
            where = ABLATIONS.get(method)
            if where is not None and not a.ablations_everywhere and setting not in where:
                continue
            if method == "oracle" and ratio == 0:
                continue                          # the control itself: nothing known to be noisy
            seeds = a.ablation_seeds if method in ABLATIONS else a.seeds
            cells += [(method, kind, ratio, seed) for seed in seeds]
    return cells

def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--noise", nargs="+", default=NOISE,
                   help="noise settings: 0.2 (shuffle) or kind:ratio")
    p.add_argument("--methods", nargs="+", default=CORE + list(ABLATIONS), choices=list(METHODS))
    p.add_argument("--ablations-everywhere", action="store_true",
                   help="run the ablations at every --noise setting, not only where ABLATIONS "
                   "puts them")
    p.add_argument("--jobs", type=int, default=2,
                   help="cells trained at once, each with cores / jobs threads")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the ablation cells")
    # the study's budget, not train.py's toy defaults
    p.add_argument("--clip", default="tiny-s", help="CLIP config of the stage-1 cells")
    p.add_argument("--epochs", type=int, default=7, help="stage-1 epochs per cell (the first is "
                   "the NFB's warm-up; 7: as long as the default run)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--stage2-epochs", type=int, default=1, help="SPN stage-2 epochs per cell")
    p.add_argument("--workers", type=int, default=0,
                   help="loader processes (0: fastest on 2 cores)")
    p.add_argument("--data-root", default=None,
                   help="toy benchmark folder (default: data/toy, generated if missing)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="only the tables and plots of a finished study")
    a = p.parse_args(argv)
    if a.report:
        return report(Path(a.report))
    cells = grid(a)                                 # bad noise settings fail here, before training
    a.data_root = toy.toy_root(a.data_root)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(clip=a.clip, epochs=a.epochs, batch_size=a.batch_size,
                    stage2_epochs=a.stage2_epochs)
    study, results = out / "study.json", out / "results.jsonl"
    if study.is_file() and json.loads(study.read_text()) != settings:
        raise ValueError(f"{out} holds a study run with {study.read_text().strip()}, not "
                         f"{settings}; pass another --out or the same settings")
    study.write_text(json.dumps(settings) + "\n")
    done = set()
    if results.is_file():
        rows = map(json.loads, results.read_text().splitlines())
        done = {(r["method"], r["kind"], r["ratio"], r["seed"]) for r in rows}
    todo = [c for c in cells if c not in done]
    # stage-2 and positives cells train on top of another cell: after the others, one at a time
    first = [c for c in todo if "+" not in c[0]]
    t0 = time.perf_counter()
    print(f"study: {len(todo)} of {len(cells)} cells to train, {a.jobs} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    with (multiprocessing.get_context("spawn").Pool(a.jobs, _worker, (threads,))
          if a.jobs > 1 else contextlib.nullcontext()) as pool:
        jobs = [(c, a, out) for c in first]
        lines = pool.imap_unordered(_cell, jobs) if pool else map(_cell, jobs)
        later = map(_cell, [(c, a, out) for c in todo if c not in first])
        for line in itertools.chain(lines, later):
            with open(results, "a") as f:
                f.write(json.dumps(util.strict_json(line)) + "\n")
            elapsed = (time.perf_counter() - t0) / 60
            print(f"{line['method']}, {noise_label(line['kind'], line['ratio'])} noise, seed "
                  f"{line['seed']}: R@1 {line['metrics']['R@1']:.1f} ({line['minutes']:.1f} min; "
                  f"{elapsed:.0f} min so far)", flush=True)
        if pool:                  # workers exit on their own: terminate() would leave a semaphore
            pool.close()
            pool.join()
    print(f"study: {len(todo)} cells in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    report(out)

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        raise SystemExit(f"error: {util.error_line(e)}")
