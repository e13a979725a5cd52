"""The noise-robustness study on the toy benchmark: injected noise x method x seed, one training run per cell.

    python study.py                          # the grid: noise 0/.2/.5/.8 x 5 methods x 3 seeds, 60 runs
    python study.py --methods ncl-weight     # add a method to the same grid (same folder, same settings)
    python study.py --noise 0 0.4 --methods ncl ncl+spn ncl+pos ncl+pos+spn --seeds 0    # SPN's table
    python study.py --report runs/study      # only the tables and the plot from the finished cells

The study's budget is its own (flags below): the `tiny-s` CLIP (a ViT of width 128 instead of `tiny`'s 192) for 3
epochs, SPN stage 2 for 1, so that a stage-1 run takes about 1.4 min and the 60 runs of the grid about 80 min on
2 CPU cores; `--clip tiny --epochs 7 --stage2-epochs 3` is train.py's own toy setting (5 min a run).

Methods (each is train.py with some flags):
    infonce       CLIP sum baseline: --no-wcb --no-nfb
    wcb           + Weight Compensation Block: --no-nfb
    nfb           + Noise-pair Filter Block: --no-wcb
    ncl           full NCL-CIR (WCB + NFB)
    ncl+spn       ncl, then SPN stage 2 (static bank of all training images) from its best checkpoint
    ncl+pos       ncl trained with SPN's generated positives (generate.py, similarity from the `ncl` run of the
                  same noise and seed, the toy's exact captions)
    ncl+pos+spn   ncl+pos, then SPN stage 2
    ncl-weight    ncl with --soft-label weight (w_i · InfoNCE_i instead of spreading 1 - w_i over the other targets)

Every cell's metrics are the validation metrics of its *last* epoch (stage-1 cells: no checkpoint selection on
the reported split; stage 2 and the positives' similarities start from the stage-1 cell's best.pt, chosen on val as
SPN does), appended to <out>/results.jsonl as soon as the cell ends: a killed study resumes where it stopped.
The report is a markdown table (mean ± std over seeds) and a PNG of R@1 against the noise ratio.
"""

import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import generate  # noqa: E402
import runtime  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402

METHODS = {"infonce": ["--no-wcb", "--no-nfb"], "wcb": ["--no-nfb"], "nfb": ["--no-wcb"], "ncl": [],
           "ncl+spn": [], "ncl+pos": [], "ncl+pos+spn": [], "ncl-weight": ["--soft-label", "weight"]}
METRICS = ("R@1", "R@5", "R@10", "Rsubset@1")
DETECTION = ("nfb_auc", "nfb_precision", "nfb_recall")


def cell_name(method, noise, seed):
    return f"{method.replace('+', '_')}-n{noise:g}-s{seed}"


def run_cell(method, noise, seed, args, out):
    """Train one cell (first the cells it builds on, if missing) and return its last-epoch log record."""
    common = ["--dataset", "toy", "--data-root", str(args.data_root), "--noise", str(noise), "--seed", str(seed),
              "--workers", str(args.workers)]
    stage1 = common + ["--clip", args.clip, "--epochs", str(args.epochs)]
    run = out / cell_name(method, noise, seed)
    if method.endswith("+spn"):                               # SPN stage 2 on top of the stage-1 cell
        base = out / cell_name(method[:-4], noise, seed)
        if not (base / "best.pt").is_file():
            run_cell(method[:-4], noise, seed, args, out)
        extra = ["--extra-triplets", str(base / "positives.json")] if "+pos" in method else []
        argv = common + ["--stage", "2", "--init", str(base / "best.pt"), "--epochs", str(args.stage2_epochs), *extra]
    elif method == "ncl+pos":                                 # positives ranked by the plain ncl cell's model
        src = out / cell_name("ncl", noise, seed)
        if not (src / "best.pt").is_file():
            run_cell("ncl", noise, seed, args, out)
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "positives.json").is_file():       # a finished cell keeps the file it was trained on
            generate.main(["--dataset", "toy", "--data-root", str(args.data_root), "--checkpoint",
                           str(src / "best.pt"), "--out", str(run / "positives.json"), "--seed", str(seed),
                           "--workers", str(args.workers)])
        argv = stage1 + ["--extra-triplets", str(run / "positives.json")]
    else:
        argv = stage1 + METHODS[method]
    epochs = train.get_args(argv).epochs
    log = run / "log.jsonl"
    if not log.is_file() or len(log.read_text().splitlines()) < epochs:     # new, or killed: (re)start / resume
        resume = ["--resume", str(run)] if (run / "last.pt").is_file() else []
        train.main(argv + ["--out", str(run)] + resume)
    return json.loads(log.read_text().splitlines()[-1])


def fmt(xs, digits=1):
    """'mean ± std' over the seeds (sample std), '—' for none."""
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


EDITS = ("color", "size", "shape", "add", "remove", "move")


def flags_by_edit(out, rows):
    """Which pairs the NFB flags (w < 0.5 after the last epoch), by edit type: % of the *clean* pairs of each edit,
    and % of the injected noisy pairs (recall), mean over seeds, for every cell with a noise filter. A filter that
    flags clean pairs of some edits far more than others is taking hard edits for noise."""
    cells = {}
    for r in rows:
        run = out / cell_name(r["method"], r["noise"], r["seed"])
        if r["method"] not in ("nfb", "ncl", "ncl-weight") or not (run / "last.pt").is_file():
            continue
        a = json.loads((run / "args.json").read_text())
        w = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["nfb"]["weights"]
        ds = data.CIRR(a["data_root"], "train", noise=data.Noise(a["noise"], a.get("noise_kind", "target"), a["seed"]))
        edits = [toy.edit_type(t["text"]) for t in ds.triplets]
        flagged, noisy = (w < 0.5).tolist(), ds.noisy.tolist()
        pct = {e: 100 * statistics.mean([f for f, k, n in zip(flagged, edits, noisy) if k == e and not n] or [0])
               for e in EDITS}
        pct["noisy"] = 100 * statistics.mean([f for f, n in zip(flagged, noisy) if n]) if any(noisy) else None
        cells.setdefault((r["method"], r["noise"]), []).append(pct)
    if not cells:
        return ""
    lines = ["| noise | method | " + " | ".join(EDITS) + " | injected noisy |", "|---|---|" + "---|" * 7]
    for (method, noise), ps in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        vals = [fmt([p[k] for p in ps if p[k] is not None]) for k in (*EDITS, "noisy")]
        lines.append(f"| {noise:.0%} | {method} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report(out):
    """Markdown table (mean ± std over seeds) and R@1-vs-noise plot from <out>/results.jsonl."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["noise"]), []).append(r)
    lines = ["| noise | method | seeds | " + " | ".join(METRICS) + " | NFB AUC | NFB precision | NFB recall |",
             "|---|---|---|" + "---|" * (len(METRICS) + 3)]
    for (method, noise), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], list(METHODS).index(kv[0][0]))):
        vals = [fmt([r["metrics"][m] for r in rs]) for m in METRICS]
        # AUC in [0, 1]; precision and recall of the w < 0.5 decision in percent
        det = [fmt([r[k] * (1 if k == "nfb_auc" else 100) for r in rs if r.get(k) is not None], 3 if k == "nfb_auc"
                   else 1) for k in DETECTION]
        lines.append(f"| {noise:.0%} | {method} | {len(rs)} | " + " | ".join(vals + det) + " |")
    table = "\n".join(lines)
    edits = flags_by_edit(out, rows)
    if edits:
        table += "\n\n% of pairs the NFB flags (w < 0.5) after the last epoch: clean pairs by edit type, and the " \
                 "injected noisy pairs\n\n" + edits
    (out / "results.md").write_text(table + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted((n, [r["metrics"]["R@1"] for r in rs]) for (m, n), rs in cells.items() if m == method)
        if pts:
            xs = [100 * n for n, _ in pts]
            ms = [statistics.mean(v) for _, v in pts]
            sd = [statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts]
            ax.errorbar(xs, ms, yerr=sd, marker="o", capsize=3, label=method)
    ax.set_xlabel("injected noise (% of training triplets)")
    ax.set_ylabel("R@1 (toy val, last epoch)")
    settings = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    ax.set_title("noise robustness on the toy benchmark" + (f"\n{settings}" if settings else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "r1_vs_noise.png", dpi=110)
    plt.close(fig)
    print(table)
    timed = [r["minutes"] for r in rows if "minutes" in r]
    took = f", {sum(timed):.0f} min of training for the {len(timed)} timed ones" if timed else ""
    print(f"\n{len(rows)} cells{took}; written: {out / 'results.md'}, {out / 'r1_vs_noise.png'}")


def main(argv=None):
    p = runtime.ArgumentParser(__doc__)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    p.add_argument("--methods", nargs="+", default=["infonce", "wcb", "nfb", "ncl", "ncl+spn"], choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # the study's budget (60 runs in about 80 min on 2 CPU cores), not train.py's toy defaults (tiny, 7 epochs)
    p.add_argument("--clip", default="tiny-s", help="CLIP config of the stage-1 cells")
    p.add_argument("--epochs", type=int, default=3, help="stage-1 epochs per cell (the first is NFB's warm-up)")
    p.add_argument("--stage2-epochs", type=int, default=1, help="SPN stage-2 epochs per cell")
    p.add_argument("--workers", type=int, default=0, help="loader processes (0: fastest on 2 cores)")
    p.add_argument("--data-root", default=None, help="toy benchmark folder (default: data/toy, generated if missing)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--report", default=None, metavar="DIR", help="only print the table and plot of a finished study")
    a = p.parse_args(argv)
    if a.report:
        return report(Path(a.report))
    a.data_root = toy.toy_root(a.data_root)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(clip=a.clip, epochs=a.epochs, stage2_epochs=a.stage2_epochs)
    if (out / "study.json").is_file() and json.loads((out / "study.json").read_text()) != settings:
        raise ValueError(f"{out} holds a study run with {(out / 'study.json').read_text().strip()}, not {settings}; "
                         "pass another --out or the same settings")
    (out / "study.json").write_text(json.dumps(settings) + "\n")
    done = set()
    if (out / "results.jsonl").is_file():
        done = {(r["method"], r["noise"], r["seed"]) for r in map(json.loads, (out / "results.jsonl").open())}
    grid = [(m, n, s) for n in a.noise for m in a.methods for s in a.seeds]
    t0 = time.perf_counter()
    for i, (method, noise, seed) in enumerate(grid, 1):
        if (method, noise, seed) in done:
            continue
        print(f"\n=== study cell {i}/{len(grid)}: {method}, noise {noise:.0%}, seed {seed} "
              f"({(time.perf_counter() - t0) / 60:.0f} min so far) ===", flush=True)
        t_cell = time.perf_counter()
        rec = run_cell(method, noise, seed, a, out)
        keep = {k: rec[k] for k in DETECTION if k in rec}
        line = dict(method=method, noise=noise, seed=seed, metrics=rec["metrics"], epoch=rec["epoch"], **keep,
                    minutes=round((time.perf_counter() - t_cell) / 60, 2))
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(runtime.strict_json(line)) + "\n")
    report(out)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        raise SystemExit(f"error: {runtime.error_line(e)}")
