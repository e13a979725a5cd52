"""The noise audit (python audit.py --checkpoint runs/X/best.pt): the training triplets the model finds suspicious, and why.

One no-grad pass over a split: every image through the model once, the distinct texts once (encode.pair_features);
every query ranked over every image of the split, its own reference removed (score_triplets, as the NFB's query
view), gives each triplet its loss, its labelled target's rank and the model's 3 best other images; the NFB's
views (nfb.pair_views: which text explains the pair, ...) and its decision (nfb.decide_views), with the run's
settings, give each view's w and the triplet's w. A low w says "suspect", and flagged_by says which view finds it
so: the query view (the labelled target is unlikely) or the text view (another text explains the reference and
target better). It does not say "wrong": a hard edit scores low as well. Writes audit.jsonl (one row per triplet,
most suspicious first), audit.png (a contact sheet of the most suspicious) and audit_summary.json.
"""

import argparse
import sys
import json
import math
import tempfile
import textwrap
import time
from pathlib import Path

import torch

import data
import plots
import runtime
import toy
from encode import Encoder, ImageSource, check_finite, pair_features
from loss import CHUNK, drop_reference, rank_of, similarities
from model import compose
from preprocess import make_transform
import nfb
from nfb import decide_views, detection_metrics, pair_views
import triplets
from triplets import NOISE_FIELDS, Noise, check_noise
import util

AUDIT_SHEET = 24          # rows of the contact sheet
AUDIT_K = (100, 500)      # precision@k / recall@k, besides k = the number of known noisy triplets


def audit_settings(run_args, dataset, root, **given):
    """The settings the audit reads and scores the split with, resolved in one place: the run's
    own (a checkpoint) over the training defaults for the dataset (runtime.defaults: zero-shot, and
    flags newer than the run); `given` (noise, noise_kind, categories, skip_missing, transform)
    replaces them where not None. -> dict of a training run's settings: tau, gmm, nfb_gate, ..."""
    s = {**vars(runtime.defaults(dataset)), **run_args}
    s.update(dataset=dataset, data_root=root, **{k: v for k, v in given.items() if v is not None})
    check_noise(Noise(s["noise"], s["noise_kind"], s["seed"]), has_subsets=data.DATASETS[dataset].subsets)
    return s


def check_writable(folder):
    """The audit's output folder, created and probed with a temporary file before any heavy work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".audit-probe-"):
            pass
    except OSError as e:
        raise SystemExit(f"error: --out {folder}: cannot write there ({type(e).__name__}: "
                         f"{e.strerror or e}); pass --out DIR, a folder you can write") from None
    return folder


@torch.no_grad()
def score_triplets(q, gallery, tgt, ref, tau, k=3, chunk=CHUNK):
    """Every query of a triplet set ranked over a gallery with its own reference image removed (as CIRR's
    protocol): the NCE loss of its labelled target over the whole gallery (loss.gallery_nce: the NFB's losses
    with --nfb-losses gallery), the target's 0-based rank, and the k best images other than the target.
    q (Q, D), gallery (G, D) L2-normalised, tgt (Q,), ref (Q,) gallery rows -> dict(loss (Q,), rank (Q,),
    top (Q, k)). Memory O(chunk x G)."""
    g = gallery.to(q.device)
    out = dict(loss=[], rank=[], top=[])
    for s in range(0, len(q), chunk):
        t = tgt[s:s + chunk].to(g.device)
        sims = drop_reference(similarities(q[s:s + chunk], g), ref[s:s + chunk], keep=t)   # (C, G)
        logp = (sims / tau).log_softmax(1)
        out["loss"].append(-logp.gather(1, t[:, None]).squeeze(1).cpu())
        out["rank"].append(rank_of(sims, t).cpu())
        sims.scatter_(1, t[:, None], float("-inf"))                           # the best *other* images
        out["top"].append(sims.topk(min(k, sims.shape[1] - 2), dim=1).indices.cpu())
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def audit_scores(enc, images, trips, s, times=None, chunk=CHUNK):
    """Every triplet of `trips` scored over the images of its split (an ImageSource) -> dict(loss
    (Q,) the query view, rank (Q,) 0-based, top (Q, 3) gallery rows, views {name: (Q,)} the NFB's views of the
    settings s (nfb_views, tau), view_w {name: (Q,)} each view's clean probability, w (Q,) the NFB's
    decision (nfb.decide_views with gmm, nfb_gate)).
    times: an optional dict that receives the seconds spent encoding and ranking."""
    t0 = time.perf_counter()
    pf = pair_features(enc, images, trips)
    q = compose(pf.f_txt[pf.text_idx], pf.f_ref)                                 # (Q, D)
    check_finite(q, pf.gallery)
    t1 = time.perf_counter()
    out = score_triplets(q, pf.gallery, trips.tgt_idx, trips.ref_idx, s["tau"], k=3, chunk=chunk)  # O(chunk x N)
    names = s["nfb_views"]
    views = pair_views(pf, [v for v in names if v != "query"], s["tau"])
    views = {"query": out["loss"], **{k: v.cpu() for k, v in views.items()}}
    w, fits = decide_views(views, names, s["gmm"], s["nfb_gate"])
    out.update(w=w.cpu(), views=views, view_w={k: f.w.cpu() for k, f in fits.items()})
    if times is not None:
        times.update(encode=t1 - t0, rank=time.perf_counter() - t1)
    return out


def split_images(trips, s, enc):
    """The split's images as the run read them: decoded once into RAM with --cache-images (the toy), else files."""
    res = enc.model.clip.image_resolution
    if s["cache_images"]:
        return ImageSource.pixels(trips, make_transform(s["transform"], res, pixels=True), enc.workers)
    return ImageSource.files(trips, make_transform(s["transform"], res))


def suspicion_order(w, loss):
    """Most suspicious first: ascending w; ties (w saturates at 0 and 1) by descending loss, then
    by index. w, loss (Q,) -> list of Q indices."""
    w, loss = w.tolist(), loss.tolist()
    return sorted(range(len(w)), key=lambda i: (w[i], -loss[i], i))


def triplet_id(t, dataset):
    """The dataset's own identifier of a triplet: CIRR and the toy {pairid, subset (img_set.id)};
    FashionIQ {category, row: its index in cap.<category>.<split>.json}; Shoes {row: its index in
    relative_captions_shoes.json}. A generated positive (--extra-triplets) has None there."""
    if dataset == "fashioniq":
        return dict(category=t["category"], row=t["line"])
    if dataset == "shoes":
        return dict(row=t["pairid"])
    return dict(pairid=t["pairid"], subset=t.get("subset"))


def audit_rows(trips, scores, dataset, w_train=None):
    """One dict per triplet, most suspicious first: index (in the split), the identifier
    (triplet_id), reference, text, target, w, loss, rank (1 = the model's first choice, reference
    removed), top3 (the best images other than the target), views {name: {loss, w}} (each view's
    score and clean probability), flagged_by (the views with w < 0.5: why the triplet is suspect),
    w_train (the run's NFB labels, when given), noise (the corrupted field, NOISE_FIELDS, when
    the truth is known)."""
    known = bool(trips.noisy.any())
    rows = []
    for i in suspicion_order(scores["w"], scores["loss"]):
        t = trips.triplets[i]
        row = dict(index=i, **triplet_id(t, dataset), reference=t["reference"], text=t["text"],
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


def audit_groups(trips, dataset):
    """The summary's breakdown: (name, a label per triplet), or None (Shoes: totals only)."""
    def edit(text):
        try:
            return toy.edit_type(text)
        except ValueError:                      # a generated positive's template text
            return "other"
    if dataset == "toy":
        return "edit type", [edit(t["text"]) for t in trips.triplets]
    if dataset == "fashioniq":
        return "category", [t["category"] for t in trips.triplets]
    if dataset == "cirr":
        return "subset", [t.get("subset") for t in trips.triplets]
    if dataset == "triplets" and all(t.get("category") for t in trips.triplets):
        return "category", [t["category"] for t in trips.triplets]
    return None


def audit_summary(trips, scores, dataset, w_train=None, ks=AUDIT_K):
    """Triplets flagged (w < 0.5): in total, by group (audit_groups), by the run's NFB (w_train).
    Where the noise is known (.noisy: the toy's own, injected): precision@k / recall@k of the
    suspicion order, ROC-AUC of 1 - w (nfb.detection_metrics) and of the loss, precision / recall
    of the flags, and the % flagged of each corrupted field (NOISE_FIELDS)."""
    from sklearn.metrics import roc_auc_score
    w, flagged = scores["w"], scores["w"] < 0.5
    out = dict(n=len(w), flagged=int(flagged.sum()),
               flagged_by_view={k: int((v < 0.5).sum()) for k, v in scores["view_w"].items()})
    if w_train is not None:
        out["flagged_train"] = int((w_train < 0.5).sum())
        out["flagged_both"] = int((flagged & (w_train < 0.5)).sum())
    noisy = trips.noisy if trips.noisy.any() else None
    groups = audit_groups(trips, dataset)
    if groups is not None:
        by = {}
        truth = noisy.tolist() if noisy is not None else [False] * len(w)
        for g, f, nz in zip(groups[1], flagged.tolist(), truth):
            c = by.setdefault(str(g), dict(n=0, flagged=0, noisy=0, clean_flagged=0))
            c["n"] += 1
            c["flagged"] += f
            c["noisy"] += nz
            c["clean_flagged"] += f and not nz
        if noisy is None:                       # nothing known: no truth columns
            by = {g: dict(n=c["n"], flagged=c["flagged"]) for g, c in by.items()}
        out["by_name"] = groups[0]
        out["by"] = dict(sorted(by.items(), key=lambda kv: -kv[1]["flagged"]))
    if noisy is not None:
        n_noisy = int(noisy.sum())
        hits = noisy[suspicion_order(w, scores["loss"])].long().cumsum(0)  # (Q,) noisy in first k
        out.update(noisy=n_noisy, random_precision=n_noisy / len(w))
        for k in dict.fromkeys(min(k, len(w)) for k in (n_noisy, *ks)):
            out[f"precision@{k}"] = hits[k - 1].item() / k
            out[f"recall@{k}"] = hits[k - 1].item() / n_noisy
        det = detection_metrics(w, noisy)
        out.update(auc=det["auc"], precision_flagged=det["precision"], recall_flagged=det["recall"])
        out["auc_loss"] = (float(roc_auc_score(noisy.numpy(), scores["loss"].numpy()))
                           if n_noisy < len(w) else math.nan)
        f = trips.noise_field
        by_field = lambda fl: {name: 100 * fl[f == k].float().mean().item()
                               for k, name in enumerate(NOISE_FIELDS) if (f == k).any()}
        out["flagged_by_field"] = by_field(flagged)
        out["view_flagged_by_field"] = {k: by_field(v < 0.5) for k, v in scores["view_w"].items()}
        out["view_auc"] = {k: float(roc_auc_score(noisy.numpy(), v.numpy())) if n_noisy < len(w) else math.nan
                           for k, v in scores["views"].items()}
    return out


def print_audit_summary(s, what, top_groups=10):
    """The summary in a few lines; of many groups (CIRR's subsets) the top_groups most flagged."""
    print(f"audit of {what}: {s['n']:,} triplets, {s['flagged']:,} flagged "
          f"(w < 0.5, {100 * s['flagged'] / s['n']:.1f}%)")
    print("  flagged by each view (a triplet is flagged when any view of the decision flags it): "
          + ", ".join(f"{k} {v:,}" for k, v in s["flagged_by_view"].items()))
    if "flagged_train" in s:
        print(f"  the run's NFB at this checkpoint flagged {s['flagged_train']:,} "
              f"(both: {s['flagged_both']:,})")
    if "by" in s:
        many = len(s["by"]) > top_groups
        print(f"  by {s['by_name']}" + (f", the {top_groups} most flagged of {len(s['by']):,}"
                                        if many else "") + ":")
        for g, c in list(s["by"].items())[:top_groups]:
            line = (f"    {g:<10} {c['flagged']:>6,} of {c['n']:>6,} flagged "
                    f"({100 * c['flagged'] / c['n']:5.1f}%)")
            if "noisy" in c:
                line += f"  noisy {c['noisy']:>6,}  clean flagged {c['clean_flagged']:>6,}"
            print(line)
    if "noisy" in s:
        ks = [key.split("@")[1] for key in s if key.startswith("precision@")]
        print(f"  known noise: {s['noisy']:,} noisy triplets (a random order's precision: "
              f"{s['random_precision']:.3f})")
        print("  " + " | ".join(f"precision@{k} {s['precision@' + k]:.3f} "
                                f"recall@{k} {s['recall@' + k]:.3f}" for k in ks))
        print(f"  ROC-AUC of 1 - w {s['auc']:.3f}, of the loss {s['auc_loss']:.3f}; the flagged: "
              f"precision {s['precision_flagged']:.3f} recall {s['recall_flagged']:.3f}")
        print("  flagged by corrupted field: "
              + ", ".join(f"{k} {v:.1f}%" for k, v in s["flagged_by_field"].items()))
        for view, by in s["view_flagged_by_field"].items():
            print(f"    the {view} view alone (AUC {s['view_auc'][view]:.3f}): "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in by.items()))


def _sheet_label(k, r):
    """The contact sheet's label of row r, the (k+1)-th most suspicious."""
    ids = " ".join(f"{key} {r[key]}" for key in ("pairid", "category", "row") if key in r)
    truth = "" if "noise" not in r else (
        "\ntruth: clean" if r["noise"] == "clean" else f"\ntruth: {r['noise']} replaced")
    why = f"\nflagged by: {', '.join(r['flagged_by'])}" if r["flagged_by"] else ""
    return f"#{k + 1} {ids}\nw {r['w']:.3f}  loss {r['loss']:.2f}  rank {r['rank']:,}" + why + truth


def audit(enc, s, ckpt, split, out_dir, chunk=CHUNK):
    """python audit.py: score every triplet of a split (train by default) with the
    settings s (audit_settings), write audit.jsonl (one row per triplet, most suspicious first),
    audit.png (the AUDIT_SHEET most suspicious) and audit_summary.json into out_dir, print the
    summary. ckpt: the run's checkpoint (its NFB labels are reported as w_train when they are of
    the same training triplets), or None (zero-shot). Other splits than train write
    audit_<split>.*. Returns the summary dict."""
    dataset = s["dataset"]
    if split == "test1" or (split == "test" and dataset == "fashioniq"):
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
    summary.update({k: s[k] for k in ("tau", "gmm", "nfb_gate", "nfb_views")}, nfb_width=nfb.WIDTH,
                   nfb_text_temp=nfb.TEXT_TEMP)
    name = "audit" if split == "train" else f"audit_{split}"
    jsonl = out_dir / f"{name}.jsonl"
    util.atomic_write(jsonl, "".join(json.dumps(util.strict_json(r)) + "\n" for r in rows))
    paths = trips.paths
    sheet = [(paths[r["reference"]], r["text"], paths[r["target"]], paths[r["top3"][0]],
              _sheet_label(k, r)) for k, r in enumerate(rows[:AUDIT_SHEET])]
    plots.audit_sheet(sheet, out_dir / f"{name}.png")
    if dataset == "triplets" and split == "train":          # your own triplets: a cleaned copy, and what it left out
        summary.update(clean_copy(trips, scores, rows, s, out_dir))
    summary.update({f"time_{k}": v for k, v in times.items()}, time_total=time.perf_counter() - t0)
    summary_json = json.dumps(util.strict_json(summary), indent=1)
    util.atomic_write(out_dir / f"{name}_summary.json", summary_json)
    noise = (f" ({s['noise_kind']} noise {s['noise']}, seed {s['seed']})"
             if split == "train" and s["noise"] else "")
    print_audit_summary(summary, f"{dataset} {split}{noise}")
    print(f"wrote {jsonl} ({len(rows):,} rows, most suspicious first), {name}.png ({len(sheet)} rows) and "
          f"{name}_summary.json in {summary['time_total']:.1f} s: decoding images "
          f"{times['decode']:.1f} s, encoding {times['encode']:.1f} s, ranking and GMM "
          f"{times['rank']:.1f} s")
    return summary


def clean_copy(trips, scores, rows, s, out_dir):
    """Your own triplets: clean.jsonl, the rows of the training file as they are there, without the triplets whose
    w is below s["clean_below"] (0.5), and removed.jsonl, the rows left out, most suspicious first, each with its
    scores under "audit" (its line in the file, w, loss, rank, each view's, and why); written atomically. Only rows
    of the file read: generated positives (--extra-triplets) are in neither, and when the audit injected noise
    (--noise) into its copy of the triplets it scored no row of the file, so it writes neither and says so. Prints
    the one command that trains on the cleaned copy. -> dict(kept, removed) for the summary."""
    file = Path(s["train_file"] or Path(s["data_root"]) / "train.jsonl")
    if s["noise"]:
        print(f"no clean.jsonl: the audit scored the triplets of {file.name} with --noise {s['noise']} injected in "
              "memory, not the file's own rows; audit with --noise 0 to clean the file")
        return {}
    drop = (scores["w"] < s["clean_below"]).tolist()
    own = [i for i, t in enumerate(trips.triplets) if t["source"] is not None]
    keep = [trips.triplets[i]["source"] for i in own if not drop[i]]
    why = ("w", "loss", "rank", "views", "flagged_by")
    removed = [{**trips.triplets[r["index"]]["source"],
                "audit": {"line": trips.triplets[r["index"]]["line"], **{k: r[k] for k in why}}}
               for r in rows if drop[r["index"]] and trips.triplets[r["index"]]["source"] is not None]
    util.atomic_write(out_dir / "clean.jsonl", "".join(json.dumps(r) + "\n" for r in keep))
    util.atomic_write(out_dir / "removed.jsonl", "".join(json.dumps(util.strict_json(r)) + "\n"
                                                             for r in removed))
    preset = f" --preset {s['preset']}" if s.get("preset") else ""
    print(f"wrote {out_dir / 'clean.jsonl'} ({len(keep):,} rows of {file.name} kept, each as it is there) and "
          f"removed.jsonl ({len(removed):,} with w < {s['clean_below']}); train on the cleaned copy:\n"
          f"  python train.py --dataset triplets --data-root {s['data_root']} --train-file "
          f"{out_dir / 'clean.jsonl'}{preset}")
    return dict(kept=len(keep), removed=len(removed), clean_below=s["clean_below"])


# -----------------------------------------------------------------------------
# the contact sheet



# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    """python audit.py [--checkpoint runs/X/best.pt | --clip NAME --dataset D --data-root DIR] ..."""
    p = util.ArgumentParser(__doc__)
    p.add_argument("--checkpoint", default=None, help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", default=None, help="zero-shot: OpenAI CLIP name or path, sum fusion")
    p.add_argument("--dataset", default=None, choices=list(data.DATASETS))
    p.add_argument("--data-root", default=None)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--split", default="train", help="the split to audit: train, or val")
    p.add_argument("--transform", default=None, choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--noise", type=float, default=None,
                   help="injected noise (default: the run's; zero-shot: the training default's)")
    p.add_argument("--noise-kind", default=None, help=", ".join(triplets.NOISE_KINDS))
    p.add_argument("--clean-below", type=float, default=0.5, help="your own triplets: clean.jsonl leaves "
                   "out the triplets whose w is below this (removed.jsonl lists them)")
    p.add_argument("--out", default=None, help="the folder for the audit's files (default: the run folder)")
    a = p.parse_args(argv)
    if not 0 < a.clean_below <= 1:
        p.error(f"--clean-below {a.clean_below}: a clean probability, in (0, 1]")
    if a.clip and not a.dataset:
        p.error("a zero-shot audit (--clip) needs --dataset (and --out DIR)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run_args, ckpt, path = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    dataset = a.dataset or run_args["dataset"]
    root = runtime.data_root(a.data_root or run_args.get("data_root"), dataset)
    s = audit_settings(run_args, dataset, root, noise=a.noise, noise_kind=a.noise_kind,
                       categories=a.categories, skip_missing=a.skip_missing or None,
                       transform=a.transform, clean_below=a.clean_below)
    if a.clip and not a.out:
        raise SystemExit("error: a zero-shot audit needs --out DIR, the folder for audit.jsonl and audit.png")
    amp, _ = runtime.autocast(run_args.get("amp", "auto"), device)    # the run's precision
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    return audit(enc, s, ckpt, a.split, Path(a.out) if a.out else path.parent)




if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
