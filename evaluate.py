"""Evaluation: the official CIRR and FashionIQ protocols, Shoes as its papers evaluate it, the evaluation CLI, CIRR
test-server files.

Protocols (the datasets' official ones)
- FashionIQ (val): per category, gallery = that category's val images; Recall@10 / Recall@50 of the target.
- CIRR (val): gallery = all images of the split; the reference image is removed from each ranking *before* any
  metric; Recall@1/5/10/50 over the whole gallery; Recall_subset@1/2/3 over the ranking restricted to the query's
  `img_set.members` minus the reference (the order inside the subset is the order of the full ranking).
- CIRR (test1): no targets; `write_submission` writes the two JSON files the evaluation server takes.
- Shoes (test; it has no val split): gallery = all 4,658 images of eval_im_names.txt; the reference image is
  removed from each ranking; Recall@1/10/50 and their mean. A query whose reference is its target (one in test)
  is a miss at every K, as in TG-CIR's, DQU-CIR's and COMBINER's code.

Ranking is by cosine similarity, computed as chunked matrix products so memory stays O(chunk x gallery). Ties are
broken by gallery order (a stable sort): an image earlier in the gallery ranks first among equals.

Usage
    python evaluate.py                                   # best checkpoint of the most recent run in runs/
    python evaluate.py --checkpoint runs/X/best.pt       # dataset, root, model read from the checkpoint
    python evaluate.py --clip ViT-B/32 --dataset cirr --data-root DIR   # zero-shot CLIP, sum fusion
    python evaluate.py --checkpoint runs/X/best.pt --split test1 --submission subs/   # CIRR server files
    python evaluate.py --clip RN50x4 --dataset shoes --data-root DIR     # Shoes test split (its default)
    python evaluate.py --audit --checkpoint runs/X/best.pt   # the suspect training triplets, and why (audit.py)
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import audit
import data
import runtime
import toy
import encode
import triplets
import util
from encode import Encoder, ImageSource, check_finite, query_features
from loss import CHUNK, drop_reference, rank_of, similarities
from model import CIRModel, compose, load_clip
from preprocess import make_transform
from runtime import EVAL_SPLIT


# -----------------------------------------------------------------------------
# ranking: every query against the whole gallery, in chunks

def _ranked(q, g, exclude=None, chunk=CHUNK):
    """(start, sims) for chunks of the queries: sims (C, G) the cosine similarities of queries start..start+C against
    the whole gallery, each query's exclude (Q,) image removed (loss.drop_reference). Memory O(chunk x G)."""
    check_finite(q, g)
    g = g.to(q.device)
    for s in range(0, len(q), chunk):
        sims = similarities(q[s:s + chunk], g)                                # (C, G)
        yield s, sims if exclude is None else drop_reference(sims, exclude[s:s + chunk])


def _lookup(index, names, what):
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} {what} not in the gallery, e.g. {missing[:3]}")
    return torch.tensor([index[n] for n in names], dtype=torch.long)


def topk(query_feats, gallery_feats, k, exclude=None, chunk=CHUNK):
    """Indices of the k most similar gallery items for every query, best first.
    query_feats (Q, D), gallery_feats (G, D), exclude (Q,) long or None: one gallery index per query to drop
    (the CIRR reference). Returns (Q, k) long. Ties keep gallery order (stable sort)."""
    k = min(k, len(gallery_feats) - (exclude is not None))          # an excluded image never fills up a short list
    return torch.cat([torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k].cpu()
                      for _, sims in _ranked(query_feats, gallery_feats, exclude, chunk)])


def _ranks(q, g, tgt, exclude=None, chunk=CHUNK):
    """0-based rank of each query's target (Q,) in its ranking over the gallery, its exclude image removed."""
    return torch.cat([rank_of(sims, tgt[s:s + len(sims)].to(sims.device)).cpu()
                      for s, sims in _ranked(q, g, exclude, chunk)])


# -----------------------------------------------------------------------------
# the three protocols

def cirr_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names, members=None,
                 chunk=CHUNK):
    """CIRR recall (percent). query_feats (Q, D), gallery_feats (G, D); names are lists; members[i] is the
    query's img_set.members (it contains the reference, which is removed here as in the official protocol), or
    members=None: no subsets, no Recall_subset. Subsets may differ in size (the triplet format's)."""
    index = {n: i for i, n in enumerate(gallery_names)}
    ref = _lookup(index, reference_names, "reference images")                 # (Q,)
    tgt = _lookup(index, target_names, "target images")                       # (Q,)
    sub = None
    if members is not None:
        rows = [[index[m] for m in ms if m != r] for ms, r in zip(members, reference_names)]
        width = max(map(len, rows))
        sub = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)   # (Q, 5): CIRR's 5
        if not (sub == tgt[:, None]).any(1).all():
            raise ValueError("a target image is missing from its query's subset members")
    ranks, sub_ranks = [], []
    for s, sims in _ranked(query_feats, gallery_feats, ref, chunk):          # the reference removed
        t = tgt[s:s + len(sims)].to(sims.device)
        ranks.append(rank_of(sims, t).cpu())
        if sub is not None:
            # Restricted ranking: the members' scores in gallery-index order keep the stable-sort tie rule;
            # padding (-1, sorted first) scores -inf and so never ranks ahead of the target
            m_sorted, _ = sub[s:s + len(sims)].to(sims.device).sort(dim=1)     # (C, 5)
            scores = sims.gather(1, m_sorted.clamp(min=0)).masked_fill(m_sorted < 0, float("-inf"))
            pos = (m_sorted == t[:, None]).long().argmax(1)                  # target's column in the subset
            sub_ranks.append(rank_of(scores, pos).cpu())
    ranks = torch.cat(ranks)
    out = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in (1, 5, 10, 50)}
    if sub is not None:
        sub_ranks = torch.cat(sub_ranks)
        out.update({f"Rsubset@{k}": 100.0 * (sub_ranks < k).double().mean().item() for k in (1, 2, 3)})
    return out


def fashioniq_metrics(query_feats, gallery_feats, gallery_names, target_names, chunk=CHUNK):
    """FashionIQ recall (percent) for one category: rank of the target among the category's val images."""
    tgt = _lookup({n: i for i, n in enumerate(gallery_names)}, target_names, "target images")
    ranks = _ranks(query_feats, gallery_feats, tgt, chunk=chunk)
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in (10, 50)}


def shoes_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names,
                  chunk=CHUNK):
    """Shoes recall (percent) as the CLIP-based Shoes papers compute it (TG-CIR, DQU-CIR, COMBINER):
    rank of the target among all test images, the query's reference removed; R@1/10/50 over every
    query. A self-pair (reference = target) is a miss at every K: its target is the removed image
    (their code sets the reference's score to the minimum, keeps the top 50 and divides by the
    number of queries). query_feats (Q, D), gallery_feats (G, D); names are lists."""
    index = {n: i for i, n in enumerate(gallery_names)}
    ref = _lookup(index, reference_names, "reference images")             # (Q,)
    tgt = _lookup(index, target_names, "target images")                   # (Q,)
    ranks = _ranks(query_feats, gallery_feats, tgt, ref, chunk)           # (Q,)
    hit = ref != tgt                                                      # a self-pair never counts
    return {f"R@{k}": 100.0 * ((ranks < k) & hit).double().mean().item() for k in (1, 10, 50)}


def format_metrics(m):
    return " ".join(f"{k} {v:.2f}" for k, v in m.items() if "_" not in k)


# -----------------------------------------------------------------------------
# validation: the evaluation sets of a run's settings and their metrics

def eval_sets(s, split):
    """[(name, triplets)] of the settings s (dataset, data_root, categories, skip_missing): one for CIRR (and the
    toy) and for Shoes, one per FashionIQ category (its own gallery)."""
    per = [(s.dataset if s.dataset in ("shoes", "triplets") else "cirr", s)]
    if s.dataset == "fashioniq":
        per = [(c, SimpleNamespace(**{**vars(s), "categories": (c,)})) for c in s.categories]
    return [(name, data.dataset(c, split)) for name, c in per]


def evaluate_sets(enc, sets, dataset, feats=None):
    """Validation metrics of the model on [(name, ImageSource, triplets)]. CIRR: R@K, Rsubset@K, avg =
    (R@5 + Rsubset@1)/2. FashionIQ: per category '<cat>_R@10', '<cat>_R@50', their means 'R@10', 'R@50', and avg.
    Shoes: R@1, R@10, R@50 and avg = their mean. Your own triplets: CIRR's protocol over the images of the split
    (Rsubset@K where every row has a subset), avg = the mean of R@1/5/10/50. feats: an optional dict that receives
    each set's (query, gallery) features, for reuse."""
    out = {}
    for name, images, trips in sets:
        q, g = query_features(enc, images, trips)
        if feats is not None:
            feats[name] = (q, g)
        tr = trips.triplets
        if dataset == "fashioniq":
            m = fashioniq_metrics(q, g, trips.images, [t["target"] for t in tr])
            out.update({f"{name}_{k}": v for k, v in m.items()})
        elif dataset == "shoes":
            out.update(shoes_metrics(q, g, trips.images, [t["reference"] for t in tr], [t["target"] for t in tr]))
        else:                                           # CIRR, the toy, your own triplets (subsets where given)
            members = [t["members"] for t in tr] if all(t["members"] for t in tr) else None
            out.update(cirr_metrics(q, g, trips.images, [t["reference"] for t in tr], [t["target"] for t in tr],
                                    members))
    if dataset == "fashioniq":
        for k in ("R@10", "R@50"):
            out[k] = sum(out[f"{n}_{k}"] for n, _, _ in sets) / len(sets)
        out["avg"] = (out["R@10"] + out["R@50"]) / 2
    elif dataset == "shoes":
        out["avg"] = (out["R@1"] + out["R@10"] + out["R@50"]) / 3
    elif dataset == "triplets":
        out["avg"] = sum(out[f"R@{k}"] for k in (1, 5, 10, 50)) / 4
    else:
        out["avg"] = (out["R@5"] + out["Rsubset@1"]) / 2
    return out


# -----------------------------------------------------------------------------
# CIRR test server files

def write_submission(out_dir, pairids, top50, top3, tag="ncl-cir"):
    """Write the two files CIRR's evaluation server takes: recall (top-50 names per pairid, reference excluded)
    and recall_subset (top-3 names within the subset). Returns their paths after checking them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, tops, k in (("recall", top50, 50), ("recall_subset", top3, 3)):
        sub = {"version": "rc2", "metric": metric}
        sub.update({str(p): list(t) for p, t in zip(pairids, tops)})
        path = out_dir / f"{metric}_submission_{tag}.json"
        util.atomic_write(path, json.dumps(sub))
        paths.append(path)
    return paths


def check_submission(path, pairids, references, metric, k):
    """Check a server file: version, metric, every pairid present with k distinct names, no query's reference in
    its own list, under the server's 5 MB limit. Raises ValueError naming the first problem."""
    path = Path(path)
    if path.stat().st_size > 5 * 2**20:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, over the server's 5 MB limit")
    sub = json.loads(path.read_text())
    if sub.get("version") != "rc2" or sub.get("metric") != metric:
        raise ValueError(f"{path}: needs version 'rc2' and metric '{metric}'")
    for p, r in zip(pairids, references):
        names = sub.get(str(p))
        if names is None:
            raise ValueError(f"{path}: pairid {p} missing")
        if len(names) != k or len(set(names)) != k:
            raise ValueError(f"{path}: pairid {p} has {len(names)} names ({len(set(names))} distinct), needs {k}")
        if r in names:
            raise ValueError(f"{path}: pairid {p} lists its own reference image {r}")
    if len(sub) != len(pairids) + 2:
        raise ValueError(f"{path}: {len(sub) - 2} entries for {len(pairids)} queries")


def cirr_rankings(q, g, gallery_names, references, members):
    """Top-50 names (reference removed) and top-3 names within the subset (members minus reference)."""
    index = {n: i for i, n in enumerate(gallery_names)}
    ref = _lookup(index, references, "reference images")
    top = topk(q, g, 50, exclude=ref)                                          # (Q, 50)
    top50 = [[gallery_names[j] for j in row] for row in top.tolist()]
    # subset members in gallery order, so ties fall as in the full ranking (stable sort)
    sub = torch.tensor([sorted(index[m] for m in ms if m != r) for ms, r in zip(members, references)],
                       device=q.device)                                                       # (Q, 5)
    sims = torch.einsum("qd,qkd->qk", F.normalize(q.float(), dim=-1), F.normalize(g.float(), dim=-1)[sub])
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :3]          # (Q, 3)
    top3 = [[gallery_names[j] for j in row] for row in sub.gather(1, order).cpu().tolist()]
    return top50, top3


# -----------------------------------------------------------------------------
# command line

def latest_best(runs="runs"):
    found = sorted(Path(runs).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"error: no run with a best.pt under {Path(runs).resolve()}; train one with "
                         f"`python train.py` or pass --checkpoint / --clip")
    return found[-1]


def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--checkpoint", default=None, help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", default=None, help="zero-shot: OpenAI CLIP name or path, sum fusion, no training")
    p.add_argument("--dataset", default=None, choices=list(EVAL_SPLIT))
    p.add_argument("--data-root", default=None)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--split", default=None, help="val (test for Shoes, which has no val), or test1 for CIRR's "
                   "server files; --audit: train (default) or val")
    p.add_argument("--transform", default=None, choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--submission", default=None, help="folder for the CIRR test-server files (with --split test1)")
    p.add_argument("--show", type=int, default=0, help="write a PNG grid of N queries with their top-5")
    p.add_argument("--audit", action="store_true", help="list the training triplets the model "
                   "finds suspicious, and why (audit.jsonl, audit.png; --split to audit another split)")
    p.add_argument("--noise", type=float, default=None,
                   help="--audit: injected noise (default: the run's; zero-shot: the training default's)")
    p.add_argument("--noise-kind", default=None, help="--audit: " + ", ".join(triplets.NOISE_KINDS))
    p.add_argument("--clean-below", type=float, default=0.5, help="--audit of your own triplets: clean.jsonl leaves "
                   "out the triplets whose w is below this (removed.jsonl lists them)")
    p.add_argument("--out", default=None, help="metrics JSON file (default next to the checkpoint; zero-shot: "
                   "none unless given); with --audit the folder for its files (default: the run folder)")
    p.add_argument("--query", default=None, help="your own query: a reference image (with --text, --gallery)")
    p.add_argument("--text", default=None, help="--query: the modification text")
    p.add_argument("--queries", default=None, help="many queries: a .jsonl of {reference, text, target?}, image "
                   "paths relative to its folder (with --gallery)")
    p.add_argument("--gallery", default=None, help="--query: a folder of images (any depth) to search")
    p.add_argument("--top", type=int, default=5, help="--query: hits to show")
    p.add_argument("--cache-dir", default="~/.cache/ncl-cir/galleries", help="--query: where the gallery's "
                   "features are kept (reused while the folder and the model are unchanged; delete to recompute)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.clip and a.checkpoint:
        raise SystemExit("error: --clip (zero-shot CLIP) and --checkpoint (a trained run) name two models; pass one")
    if a.query or a.queries:
        return query(a, device)
    if not 0 < a.clean_below <= 1:
        raise SystemExit(f"error: --clean-below {a.clean_below}: a clean probability, in (0, 1]")
    if a.audit and a.submission:
        raise SystemExit("error: --audit lists a split's suspect triplets, --submission writes "
                         "CIRR's test-server files: run them one at a time")
    if not a.audit and (a.noise is not None or a.noise_kind is not None):
        raise SystemExit("error: --noise / --noise-kind are for --audit (evaluation splits carry "
                         "no injected noise)")

    # the dataset and its folder first, so that a bad --data-root stops before a checkpoint is downloaded
    ckpt, path = None, None
    if not a.clip:
        path = Path(a.checkpoint) if a.checkpoint else latest_best()
        if not a.checkpoint:
            print(f"evaluating {path} (the most recent run)")
        ckpt = runtime.load_checkpoint(path)
    run_args = ckpt["args"] if ckpt else {}
    if a.clip and not a.dataset:
        raise SystemExit("error: --clip needs --dataset (and --data-root for cirr / fashioniq / shoes)")
    if a.dataset and run_args and a.dataset != run_args["dataset"]:
        raise SystemExit(f"error: {path} was trained on {run_args['dataset']}, not {a.dataset}; pass "
                         f"--dataset {run_args['dataset']} or a {a.dataset} checkpoint")
    dataset = a.dataset or run_args["dataset"]
    preset = vars(runtime.defaults(dataset))
    root = a.data_root or run_args.get("data_root") or (str(toy.default_toy_root()) if dataset == "toy" else None)
    if not root:
        raise SystemExit(f"error: --dataset {dataset} needs --data-root DIR")
    if dataset != "toy" and not Path(root).expanduser().is_dir():
        raise SystemExit(f"error: --data-root {root}: no such folder; point it at the {dataset} dataset folder")
    categories = a.categories or run_args.get("categories") or preset["categories"]
    model = CIRModel(load_clip(a.clip, device="cpu")[0], wcb=False) if a.clip else runtime.build_model(ckpt)
    model = model.to(device).eval()
    transform_name = a.transform or run_args.get("transform") or preset["transform"]
    amp, _ = runtime.autocast(run_args.get("amp", "auto"), device)    # the run's precision: metrics match its log
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    if a.audit:
        s = audit.audit_settings(run_args, dataset, root, noise=a.noise, noise_kind=a.noise_kind,
                                 categories=categories, skip_missing=a.skip_missing or None,
                                 transform=transform_name, clean_below=a.clean_below)
        if not (a.out or path):
            raise SystemExit("error: a zero-shot --audit needs --out DIR, the folder for audit.jsonl and audit.png")
        return audit.audit(enc, s, ckpt, a.split or "train", Path(a.out) if a.out else path.parent)
    a.split = a.split or EVAL_SPLIT[dataset]
    s = SimpleNamespace(dataset=dataset, data_root=root, categories=categories, skip_missing=a.skip_missing)
    transform = make_transform(transform_name, model.clip.image_resolution)
    sets = [(name, ImageSource.files(ds, transform), ds) for name, ds in eval_sets(s, a.split)]

    if dataset == "toy" and a.split == "test1" and not a.submission:   # the toy keeps its test answers aside
        sets = [(name, images, toy.with_answers(ds, root)) for name, images, ds in sets]
    elif dataset in ("cirr", "toy") and a.split.startswith("test"):
        if not a.submission:
            raise SystemExit(f"error: the {a.split} split has no public targets; pass --submission DIR to write "
                             f"the CIRR evaluation server's files")
        _, images, trips = sets[0]
        q, g = query_features(enc, images, trips)
        tr = trips.triplets
        refs, pairids = [t["reference"] for t in tr], [t["pairid"] for t in tr]
        top50, top3 = cirr_rankings(q, g, trips.images, refs, [t["members"] for t in tr])
        paths = write_submission(a.submission, pairids, top50, top3)
        for sub, metric, k in zip(paths, ("recall", "recall_subset"), (min(50, len(trips.images) - 1), 3)):
            check_submission(sub, pairids, refs, metric, k)
        print(f"wrote and checked {len(pairids)} queries: " + ", ".join(map(str, paths)))
        return paths
    if any(t["target"] is None for _, _, trips in sets for t in trips.triplets):
        raise SystemExit(f"error: the {dataset} {a.split} split has no public targets; evaluate on --split val")

    feats = {}
    metrics = evaluate_sets(enc, sets, dataset, feats)
    width = max(map(len, metrics))
    print(f"{dataset} {a.split}" + (f" ({', '.join(categories)})" if dataset == "fashioniq" else ""))
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:6.2f}")
    out = Path(a.out) if a.out else path.with_name(f"metrics_{dataset}_{a.split}.json") if path else None
    if out is not None:
        util.atomic_write(out, json.dumps(metrics, indent=1))
        print(f"metrics written to {out}")
    else:
        print("(zero-shot: pass --out FILE to save the metrics)")
    if a.show:
        name, images, trips = sets[0]
        q, g = feats[name]
        n = min(a.show, len(q))
        exclude = None if dataset == "fashioniq" else trips.ref_idx[:n]
        top = topk(q[:n], g, 5, exclude=exclude)
        rows = [(trips.paths[t["reference"]], t["text"],
                 [(trips.paths[trips.images[j]], trips.images[j] == t["target"]) for j in row])
                for t, row in zip(trips.triplets[:n], top.tolist())]
        grid = (out or Path(".") / "metrics.json").with_name(f"show_{dataset}_{a.split}.png")
        query_grid(rows, grid)
        print(f"query grid written to {grid}")
    return metrics


# -----------------------------------------------------------------------------
# your own query: a reference image and a text against a folder of images

def query(a, device):
    """python evaluate.py --query IMAGE --text TEXT --gallery DIR (or --queries FILE): the model's top hits in the
    folder, best first, one line each with the image's path last (--queries: the first QUERIES_SHOWN queries, then
    the count); every query's hits and its target's rank, where its row names one, in a JSON-lines file (--queries),
    and a picture of the first --show queries (default 8), a missed target drawn at its row's end. The files go
    beside the checkpoint (zero-shot: the working directory), or --out PICTURE.png (the hits beside it, .jsonl).
    The query image itself, if it is in the folder, is not returned; unreadable files of the folder are skipped and
    named. Bad input stops before any model runs."""
    if not a.gallery or not Path(a.gallery).expanduser().is_dir():
        raise SystemExit(f"error: --gallery {a.gallery}: no such folder; pass the folder of images to search")
    if a.query and a.text is None:
        raise SystemExit("error: --query needs --text, the modification text")
    if a.query and not a.text.strip():
        raise SystemExit("error: --text is empty: give the modification text, e.g. --text \"with a red collar\"")
    qs = read_queries(a)
    gallery = Path(os.path.abspath(Path(a.gallery).expanduser()))
    if not encode.scan_folder(gallery):
        raise SystemExit(f"error: --gallery {gallery}: no image ({', '.join(encode.IMAGE_SUFFIXES)}) in it or below it")
    source = Path(a.clip) if a.clip else Path(a.checkpoint) if a.checkpoint else latest_best()
    out = Path(a.out) if a.out else (source.parent if a.checkpoint or not a.clip else Path(".")) / (
        f"queries_{Path(a.queries).stem}.png" if a.queries else "query.png")
    if a.clip:
        model, run_args = CIRModel(load_clip(a.clip, device="cpu")[0], wcb=False), {}
    else:
        ckpt = runtime.load_checkpoint(source)
        model, run_args = runtime.build_model(ckpt), ckpt["args"]
    model = model.to(device).eval()
    transform_name = a.transform or run_args.get("transform", "clip")
    transform = make_transform(transform_name, model.clip.image_resolution)
    st = source.stat() if source.is_file() else None     # the model: its file (name, size, time) or released name
    model_id = [str(source.resolve()) if st else str(source), st and st.st_size, st and st.st_mtime_ns,
                transform_name, model.clip.image_resolution]
    enc = Encoder(model, a.batch_size, device, a.workers)
    names, g, skipped, cache, hit = encode.folder_features(enc, gallery, transform, model_id, a.cache_dir)
    print(f"gallery {gallery}: {len(names):,} images, features {'read from' if hit else 'computed and kept in'} "
          f"{cache} (delete it to recompute)")
    if skipped:
        print(f"gallery {gallery}: {len(skipped)} unreadable file{'s' * (len(skipped) > 1)} skipped: "
              + ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    paths = [gallery / n for n in names]
    index = {str(p): i for i, p in enumerate(paths)}
    refs = [str(ref) for ref, _, _ in qs]             # the query images, batched as any split's images
    f_ref, _ = encode.encode_images(enc, ImageSource.files(SimpleNamespace(images=refs, paths=dict(zip(refs, refs))),
                                                           transform))
    q = compose(encode.encode_texts(enc, [t for _, t, _ in qs]), f_ref.float())
    g = g.to(q.device)                                 # the cache is read to the CPU; the queries are the model's
    exclude = torch.tensor([index.get(str(ref), -1) for ref, _, _ in qs])         # the query image itself
    tgt = torch.tensor([index.get(str(t), -1) if t else -1 for _, _, t in qs])     # -1: none, or not in the folder
    top = topk(q, g, a.top, exclude=exclude)
    ranks = _ranks(q, g, tgt.clamp(min=0), exclude) + 1                              # (Q,) 1-based
    results = []
    for k, ((ref, text, target), row) in enumerate(zip(qs, top.tolist())):
        sims = (F.normalize(q[k], dim=-1) @ g[row].T).tolist()
        results.append(dict(reference=str(ref), text=text, target=str(target) if target else None,
                            target_rank=int(ranks[k]) if tgt[k] >= 0 else None,
                            hits=[dict(path=str(paths[j]), similarity=round(sim, 6)) for j, sim in zip(row, sims)]))
    for r in results[:QUERIES_SHOWN if a.queries else 1]:
        print(f"query {r['reference']}: {r['text']!r}" + (f" (target rank {r['target_rank']:,})"
                                                          if r["target_rank"] else ""))
        for k, h in enumerate(r["hits"], start=1):
            print(f"  {k:>3}  {h['similarity']:.4f}  {h['path']}")
    with_target = [r for r in results if r["target"]]
    hits = sum(r["target_rank"] is not None and r["target_rank"] <= a.top for r in with_target)
    if a.queries:
        util.atomic_write(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in results))
        print(f"{len(results):,} queries" + (f", {len(results) - QUERIES_SHOWN:,} more than printed" if
                                             len(results) > QUERIES_SHOWN else "")
              + f": every query's hits in {out.with_suffix('.jsonl')}")
    if with_target:
        lost = sum(r["target_rank"] is None for r in with_target)
        print(f"target within the top {a.top}: {hits} of {len(with_target)} queries "
              f"({100 * hits / len(with_target):.1f}%)" + (f"; {lost} targets are not in the folder" if lost else ""))
    rows = [(Path(r["reference"]), r["text"], [(Path(h["path"]), h["path"] == r["target"]) for h in r["hits"]],
             (Path(r["target"]), r["target_rank"]) if r["target"] and not any(h["path"] == r["target"]
                                                                          for h in r["hits"]) else None)
            for r in results[:a.show or 8]]
    query_grid(rows, out)
    print(f"picture of {len(rows)} quer{'ies' if len(rows) > 1 else 'y'} written to {out}"
          + (f" (--show N for more)" if len(results) > len(rows) else ""))
    return dict(hits=hits, queries=len(qs), with_target=len(with_target), top=top, names=names, results=results,
                skipped=skipped, picture=out)


QUERIES_SHOWN = 3          # --queries: the queries whose hits are printed (all of them are in the .jsonl file)


def read_queries(a):
    """[(reference path, text, target path or None)] of --query / --queries, paths absolute and normalised; every
    query image readable and every text given, in one line naming the row, before any model is loaded."""
    if a.queries:
        file = Path(a.queries).expanduser()
        if not file.is_file():
            raise SystemExit(f"error: --queries {a.queries}: no such file; one JSON object a line with reference, "
                             "text (and target)")
        norm = lambda n: Path(os.path.abspath(file.parent / str(n)))
        rows = [(norm(row.get("reference", "")), str(row.get("text", "")).strip(),
                 norm(row["target"]) if row.get("target") else None, f"{a.queries} row {r}")
                for r, row in triplets.read_rows(file)]
    else:
        rows = [(Path(os.path.abspath(Path(a.query).expanduser())), a.text.strip(), None, "--query")]
    for ref, text, _, where in rows:
        if not text:
            raise SystemExit(f"error: {where}: no text; every query needs a reference image and a text")
        try:
            triplets.load_image(ref)
        except OSError as e:
            raise SystemExit(f"error: {where}: cannot read the query image {ref} "
                             f"({type(e.__cause__ or e).__name__}); pass an image file") from None
    return [r[:3] for r in rows]


# -----------------------------------------------------------------------------
# the picture of --query and --queries

def query_grid(rows, path):
    """One row per query: the reference image, its modification text, then the top-k retrieved images with the
    true target framed in green; a target the top-k missed comes last, framed in red, with its rank. rows:
    [(ref_path, text, [(path, is_target), ...], (target_path, rank or None) or None)]; the 4th item is optional."""
    from PIL import Image
    rows = [(*r, None) if len(r) == 3 else r for r in rows]
    k = max(len(r[2]) + (r[3] is not None) for r in rows)
    plt = util.pyplot()
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.8 * (k + 1), 2.0 * len(rows)), squeeze=False)
    for ax_row, (ref, text, hits, missed) in zip(axes, rows):
        with Image.open(ref) as im:
            ax_row[0].imshow(im.convert("RGB"))
        ax_row[0].set_title("reference", fontsize=7)
        ax_row[0].set_xlabel(text if len(text) < 60 else text[:57] + "...", fontsize=6)
        for j, ax in enumerate(ax_row[1:]):
            if j < len(hits):
                hit_path, is_target = hits[j]
                with Image.open(hit_path) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title(f"#{j + 1}" + (" target" if is_target else ""), fontsize=7,
                             color="green" if is_target else "black")
                for side in ax.spines.values():
                    side.set_edgecolor("green" if is_target else "white")
                    side.set_linewidth(4 if is_target else 0)
            elif j == len(hits) and missed is not None and Path(missed[0]).is_file():
                with Image.open(missed[0]) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title("target" + (f", rank {missed[1]:,}" if missed[1] else ", not in the folder"),
                             fontsize=7, color="red")
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(4)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
