"""The noise audit (python audit.py --checkpoint runs/X/best.pt): the training triplets the model
finds suspicious, and why. One no-grad pass scores every triplet of a split by the NFB's views (the
query view: its target's loss over the split's images less its reference; the text view: another
text explains the pair better; ...) and decision, with the run's settings. A low w says "suspect",
not "wrong" (a hard edit scores low too); flagged_by names the views that find it so. Writes
audit.jsonl (most suspicious first), audit.png (a contact sheet) and audit_summary.json; for your
own triplets also clean.jsonl and removed.jsonl (clean_copy).
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import plots
import runtime
import util
from encode import Encoder, ImageSource, check_finite, pair_features
from loss import CHUNK, drop_reference, rank_of, similarities
from model import compose
from nfb import TEXT_TEMP, WIDTH, decide_views, detection_metrics, pair_views
from preprocess import make_transform
from triplets import NOISE_FIELDS, NOISE_KINDS, Noise, check_noise

AUDIT_SHEET = 24          # rows of the contact sheet
AUDIT_K = (100, 500)      # precision@k / recall@k, besides k = the number of known noisy triplets

def audit_settings(run_args, dataset, root, **given):
    """The audit's settings in one place: the run's over the training defaults for the dataset
    (runtime.defaults: zero-shot, and flags newer than the run), then `given` where not None."""
    s = {**vars(runtime.defaults(dataset)), **run_args}
    s.update(dataset=dataset, data_root=root, **{k: v for k, v in given.items() if v is not None})
    check_noise(Noise(s["noise"], s["noise_kind"], s["seed"]), data.DATASETS[dataset].subsets)
    return s

def check_writable(folder):
    """The audit's output folder, created and probed with a temporary file before any heavy work."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: --out {folder}: cannot write there ({type(e).__name__}: "
                         f"{e.strerror or e}); pass --out DIR, a folder you can write") from None
    return Path(folder)

@torch.no_grad()
def score_triplets(q, gallery, tgt, ref, tau, k=3, chunk=CHUNK):
    """Each query over the gallery less its reference (CIRR's protocol): its target's NCE loss (as
    loss.gallery_nce), 0-based rank and the k best other images. q (Q, D), gallery (G, D) unit,
    tgt, ref (Q,) rows -> dict(loss (Q,), rank (Q,), top (Q, k)); memory O(chunk x G)."""
    g = gallery.to(q.device)
    out = dict(loss=[], rank=[], top=[])
    for s in range(0, len(q), chunk):
        t = tgt[s:s + chunk].to(g.device)
        sims = drop_reference(similarities(q[s:s + chunk], g), ref[s:s + chunk], keep=t)  # (C, G)
        logp = (sims / tau).log_softmax(1)
        out["loss"].append(-logp.gather(1, t[:, None]).squeeze(1).cpu())
        out["rank"].append(rank_of(sims, t).cpu())
        sims.scatter_(1, t[:, None], float("-inf"))                   # the best *other* images
        out["top"].append(sims.topk(min(k, sims.shape[1] - 2), dim=1).indices.cpu())
    return {key: torch.cat(v) for key, v in out.items()}

@torch.no_grad()
def audit_scores(enc, images, trips, s, times=None, chunk=CHUNK):
    """Every triplet scored over its split's images (an ImageSource) -> score_triplets' dict (loss:
    the query view) + views {name: (Q,)} (s: nfb_views, tau), view_w {name: (Q,)} each view's clean
    probability, w (Q,) the decision (gmm, nfb_gate). times: gets the seconds encoding, ranking."""
    t0 = time.perf_counter()
    pf = pair_features(enc, images, trips)
    q = compose(pf.f_txt[pf.text_idx], pf.f_ref)                                 # (Q, D)
    check_finite(q, pf.gallery)
    t1 = time.perf_counter()
    out = score_triplets(q, pf.gallery, trips.tgt_idx, trips.ref_idx, s["tau"], k=3, chunk=chunk)
    views = pair_views(pf, [v for v in s["nfb_views"] if v != "query"], s["tau"])
    views = {"query": out["loss"], **{k: v.cpu() for k, v in views.items()}}
    w, fits = decide_views(views, s["nfb_views"], s["gmm"], s["nfb_gate"])
    out.update(w=w.cpu(), views=views, view_w={k: f.w.cpu() for k, f in fits.items()})
    if times is not None:
        times.update(encode=t1 - t0, rank=time.perf_counter() - t1)
    return out

def split_images(trips, s, enc):
    """The split's images as the run read them: in RAM with --cache-images (the toy), else files."""
    res, tf = enc.model.clip.image_resolution, s["transform"]
    if s["cache_images"]:
        return ImageSource.pixels(trips, make_transform(tf, res, pixels=True), enc.workers)
    return ImageSource.files(trips, make_transform(tf, res))

def suspicion_order(w, loss):
    """Ascending w (Q,); ties (w saturates at 0 and 1) by descending loss (Q,), then index."""
    w, loss = w.tolist(), loss.tolist()
    return sorted(range(len(w)), key=lambda i: (w[i], -loss[i], i))

def audit_rows(trips, scores, dataset, w_train=None):
    """A dict per triplet, most suspicious first: index, the dataset's identifier (Spec.ident),
    reference, text, target, w, loss, rank (from 1), top3, views {name: {loss, w}}, flagged_by (the
    views with w < 0.5), w_train (the run's labels, if given), noise (NOISE_FIELDS, if known)."""
    ident, known, rows = data.DATASETS[dataset].ident, bool(trips.noisy.any()), []
    for i in suspicion_order(scores["w"], scores["loss"]):
        t = trips.triplets[i]
        row = dict(index=i, **ident(t), reference=t["reference"], text=t["text"],
                   target=t["target"], w=float(scores["w"][i]), loss=float(scores["loss"][i]),
                   rank=int(scores["rank"][i]) + 1,
                   top3=[trips.images[j] for j in scores["top"][i].tolist()],
                   views={k: dict(loss=float(v[i]), w=float(scores["view_w"][k][i]))
                          for k, v in scores["views"].items()},
                   flagged_by=[k for k, w in scores["view_w"].items() if w[i] < 0.5])
        if w_train is not None:
            row["w_train"] = float(w_train[i])
        if known:
            row["noise"] = NOISE_FIELDS[int(trips.noise_field[i])]
        rows.append(row)
    return rows

def audit_summary(trips, scores, dataset, w_train=None, ks=AUDIT_K):
    """Triplets flagged (w < 0.5): in total, by group (Spec.group), by the run's NFB (w_train).
    Known noise (.noisy): precision@k / recall@k of the order, ROC-AUC of 1 - w and of the loss,
    the flags' precision / recall (nfb.detection_metrics), % flagged per field (NOISE_FIELDS)."""
    from sklearn.metrics import roc_auc_score
    w, flagged = scores["w"], scores["w"] < 0.5
    noisy = trips.noisy if trips.noisy.any() else None
    out = dict(n=len(w), flagged=int(flagged.sum()),
               flagged_by_view={k: int((v < 0.5).sum()) for k, v in scores["view_w"].items()})
    if w_train is not None:
        out.update(flagged_train=int((w_train < 0.5).sum()),
                   flagged_both=int((flagged & (w_train < 0.5)).sum()))
    group = data.DATASETS[dataset].group
    groups = group(trips.triplets) if group else None               # None: totals only (Shoes)
    if groups is not None:
        labels = [str(g) for g in groups[1]]
        ids = {g: j for j, g in enumerate(dict.fromkeys(labels))}   # in order of appearance
        idx = torch.tensor([ids[g] for g in labels], dtype=torch.long)                    # (Q,)
        cols = dict(n=torch.ones_like(flagged), flagged=flagged)
        if noisy is not None:                                       # truth columns if known
            cols.update(noisy=noisy, clean_flagged=flagged & ~noisy)
        n = {k: torch.bincount(idx[m], minlength=len(ids)).tolist() for k, m in cols.items()}
        by = {g: {k: c[j] for k, c in n.items()} for g, j in ids.items()}
        out.update(by_name=groups[0], by=dict(sorted(by.items(), key=lambda kv: -kv[1]["flagged"])))
    if noisy is None:
        return out
    n_noisy = int(noisy.sum())
    auc = lambda x: (float(roc_auc_score(noisy.numpy(), x.numpy())) if n_noisy < len(w)
                     else math.nan)
    hits = noisy[suspicion_order(w, scores["loss"])].long().cumsum(0)    # (Q,) noisy in first k
    out.update(noisy=n_noisy, random_precision=n_noisy / len(w))
    for k in dict.fromkeys(min(k, len(w)) for k in (n_noisy, *ks)):
        out[f"precision@{k}"] = hits[k - 1].item() / k
        out[f"recall@{k}"] = hits[k - 1].item() / n_noisy
    det = detection_metrics(w, noisy)
    out.update(auc=det["auc"], precision_flagged=det["precision"], recall_flagged=det["recall"],
               auc_loss=auc(scores["loss"]))
    f = trips.noise_field
    by_field = lambda fl: {name: 100 * fl[f == k].float().mean().item()
                           for k, name in enumerate(NOISE_FIELDS) if (f == k).any()}
    out["flagged_by_field"] = by_field(flagged)
    out["view_flagged_by_field"] = {k: by_field(v < 0.5) for k, v in scores["view_w"].items()}
    out["view_auc"] = {k: auc(v) for k, v in scores["views"].items()}
    return out

def print_audit_summary(s, what, top_groups=10):
    """The summary in a few lines; of many groups (CIRR's subsets) the top_groups most flagged."""
    print(f"audit of {what}: {s['n']:,} triplets, {s['flagged']:,} flagged (w < 0.5, "
          f"{100 * s['flagged'] / s['n']:.1f}%)\n  flagged by each view (a triplet is flagged when "
          "any view of the decision flags it): "
          + ", ".join(f"{k} {v:,}" for k, v in s["flagged_by_view"].items()))
    if "flagged_train" in s:
        print(f"  the run's NFB at this checkpoint flagged {s['flagged_train']:,} "
              f"(both: {s['flagged_both']:,})")
    by = s.get("by", {})
    if by:
        most = f", the {top_groups} most flagged of {len(by):,}" if len(by) > top_groups else ""
        print(f"  by {s['by_name']}{most}:")
    for g, c in list(by.items())[:top_groups]:
        truth = (f"  noisy {c['noisy']:>6,}  clean flagged {c['clean_flagged']:>6,}"
                 if "noisy" in c else "")
        print(f"    {g:<10} {c['flagged']:>6,} of {c['n']:>6,} flagged "
              f"({100 * c['flagged'] / c['n']:5.1f}%){truth}")
    if "noisy" not in s:
        return
    ks = [key.split("@")[1] for key in s if key.startswith("precision@")]
    pct = lambda by: ", ".join(f"{k} {v:.1f}%" for k, v in by.items())
    print(f"  known noise: {s['noisy']:,} noisy triplets (a random order's precision: "
          f"{s['random_precision']:.3f})\n  " + " | ".join(
              f"precision@{k} {s['precision@' + k]:.3f} recall@{k} {s['recall@' + k]:.3f}"
              for k in ks))
    print(f"  ROC-AUC of 1 - w {s['auc']:.3f}, of the loss {s['auc_loss']:.3f}; the flagged: "
          f"precision {s['precision_flagged']:.3f} recall {s['recall_flagged']:.3f}\n"
          "  flagged by corrupted field: " + pct(s["flagged_by_field"]))
    for view, by in s["view_flagged_by_field"].items():
        print(f"    the {view} view alone (AUC {s['view_auc'][view]:.3f}): " + pct(by))

def _sheet_label(k, r):
    """The contact sheet's label of row r, the (k+1)-th most suspicious."""
    ids = " ".join(f"{key} {r[key]}" for key in ("pairid", "category", "row") if key in r)
    truth = "" if "noise" not in r else (
        "\ntruth: clean" if r["noise"] == "clean" else f"\ntruth: {r['noise']} replaced")
    why = f"\nflagged by: {', '.join(r['flagged_by'])}" if r["flagged_by"] else ""
    return f"#{k + 1} {ids}\nw {r['w']:.3f}  loss {r['loss']:.2f}  rank {r['rank']:,}" + why + truth

def _jsonl(path, rows):
    util.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

def audit(enc, s, ckpt, split, out_dir, chunk=CHUNK):
    """python audit.py: a split scored with the settings s (audit_settings) into out_dir:
    audit.jsonl, .png (the AUDIT_SHEET most suspicious), _summary.json (audit_<split>.* for other
    splits). ckpt: the run's (its NFB labels: w_train, if of these triplets) or None. -> summary"""
    dataset, spec = s["dataset"], data.DATASETS[s["dataset"]]
    if split == "test1" or (split == "test" and spec.per_category):    # FashionIQ's has no targets
        raise SystemExit(f"error: --split {split}: the {dataset} {split} split has no "
                         f"public targets to audit; use --split train (the default) or val")
    out_dir = check_writable(out_dir)
    trips = data.dataset(argparse.Namespace(**s), split)
    if (trips.tgt_idx < 0).any():
        raise SystemExit(f"error: --split {split}: the {dataset} {split} split has no "
                         f"targets; use --split train (the default) or val")
    w_train = None                             # the run's NFB labels, if of these very triplets
    if ckpt is not None and ckpt.get("nfb") is not None and split == "train":
        w_train = ckpt["nfb"]["weights"].float()
        changed = runtime.triplet_changes(s, ckpt["args"])
        if changed or len(w_train) != len(trips):
            print(f"audit: the run's NFB labels {len(w_train)} triplets, this split {len(trips)} "
                  f"({', '.join(changed) or 'other data'} changed): not reported")
            w_train = None
    t0 = time.perf_counter()
    images = split_images(trips, s, enc)
    times = dict(decode=time.perf_counter() - t0)
    scores = audit_scores(enc, images, trips, s, times, chunk)
    rows = audit_rows(trips, scores, dataset, w_train)
    summary = audit_summary(trips, scores, dataset, w_train)
    summary.update({k: s[k] for k in ("tau", "gmm", "nfb_gate", "nfb_views")}, nfb_width=WIDTH,
                   nfb_text_temp=TEXT_TEMP)
    name = "audit" if split == "train" else f"audit_{split}"
    _jsonl(out_dir / f"{name}.jsonl", map(util.strict_json, rows))
    p = trips.paths
    sheet = [(p[r["reference"]], r["text"], p[r["target"]], p[r["top3"][0]], _sheet_label(k, r))
             for k, r in enumerate(rows[:AUDIT_SHEET])]
    plots.audit_sheet(sheet, out_dir / f"{name}.png")
    if spec.own_rows and split == "train":
        summary.update(clean_copy(trips, scores, rows, s, out_dir))
    summary.update({f"time_{k}": v for k, v in times.items()}, time_total=time.perf_counter() - t0)
    util.atomic_write(out_dir / f"{name}_summary.json",
                      json.dumps(util.strict_json(summary), indent=1))
    noise = (f" ({s['noise_kind']} noise {s['noise']}, seed {s['seed']})"
             if split == "train" and s["noise"] else "")
    print_audit_summary(summary, f"{dataset} {split}{noise}")
    print(f"wrote {out_dir / name}.jsonl ({len(rows):,} rows, most suspicious first), {name}.png "
          f"({len(sheet)} rows) and {name}_summary.json in {summary['time_total']:.1f} s: decoding "
          f"{times['decode']:.1f} s, encoding {times['encode']:.1f} s, ranking and GMM "
          f"{times['rank']:.1f} s")
    return summary

def clean_copy(trips, scores, rows, s, out_dir):
    """Your own triplets: clean.jsonl, the training file's rows as they are there less those of w
    below s["clean_below"], and removed.jsonl, those, most suspicious first, with their scores under
    "audit". Only the file's rows (no generated positives; none when --noise made a noisy copy).
    Prints the command that trains on clean.jsonl. -> dict(kept, removed, clean_below)"""
    file = Path(s["train_file"] or Path(s["data_root"]) / "train.jsonl")
    if s["noise"]:
        print(f"no clean.jsonl: the audit scored {file.name} with --noise {s['noise']} injected "
              "in memory, not the file's own rows; audit with --noise 0 to clean the file")
        return {}
    src, drop = [t["source"] for t in trips.triplets], (scores["w"] < s["clean_below"]).tolist()
    keep = [r for r, d in zip(src, drop) if r is not None and not d]
    why = ("w", "loss", "rank", "views", "flagged_by")
    removed = [{**src[i], "audit": {"line": trips.triplets[i]["line"], **{k: r[k] for k in why}}}
               for r in rows for i in (r["index"],) if drop[i] and src[i] is not None]
    _jsonl(out_dir / "clean.jsonl", keep)
    _jsonl(out_dir / "removed.jsonl", map(util.strict_json, removed))
    preset = f" --preset {s['preset']}" if s.get("preset") else ""
    print(f"wrote {out_dir / 'clean.jsonl'} ({len(keep):,} rows of {file.name} kept, each as it is "
          f"there) and removed.jsonl ({len(removed):,} with w < {s['clean_below']}); train on the "
          f"cleaned copy:\n  python train.py --dataset triplets --data-root {s['data_root']} "
          f"--train-file {out_dir / 'clean.jsonl'}{preset}")
    return dict(kept=len(keep), removed=len(removed), clean_below=s["clean_below"])

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    """python audit.py [--checkpoint runs/X/best.pt | --clip NAME --dataset D --data-root DIR]"""
    p = util.ArgumentParser(__doc__)
    runtime.model_flags(p)
    p.add_argument("--split", default="train", help="the split to audit: train, or val")
    p.add_argument("--transform", choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--noise", type=float,
                   help="injected noise (default: the run's; zero-shot: the training default's)")
    p.add_argument("--noise-kind", help=", ".join(NOISE_KINDS))
    p.add_argument("--clean-below", type=float, default=0.5, help="your own triplets: clean.jsonl "
                   "leaves out the triplets whose w is below this (removed.jsonl lists them)")
    p.add_argument("--out", help="the folder for the audit's files (default: the run folder)")
    a = p.parse_args(argv)
    if not 0 < a.clean_below <= 1:
        p.error(f"--clean-below {a.clean_below}: a clean probability, in (0, 1]")
    if a.clip and not a.dataset:
        p.error("a zero-shot audit (--clip) needs --dataset (and --out DIR)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run_args, ckpt, path = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    dataset = a.dataset or run_args["dataset"]
    root = data.data_root(a.data_root or run_args.get("data_root"), dataset)
    s = audit_settings(run_args, dataset, root, noise=a.noise, noise_kind=a.noise_kind,
                       categories=a.categories, skip_missing=a.skip_missing or None,
                       transform=a.transform, clean_below=a.clean_below)
    if a.clip and not a.out:
        raise SystemExit("error: a zero-shot audit needs --out DIR, the folder for audit.jsonl and "
                         "audit.png")
    amp, _ = runtime.autocast(run_args.get("amp", "auto"), device)    # the run's precision
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    return audit(enc, s, ckpt, a.split, Path(a.out) if a.out else path.parent)

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
