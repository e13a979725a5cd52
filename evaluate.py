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
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
import plots
import runtime
import toy
import util
from encode import Encoder, ImageSource, check_finite, query_features
from loss import CHUNK, drop_reference, rank_of, similarities
from preprocess import make_transform


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
    """[(name, triplets)] of the settings s (dataset, data_root, categories, skip_missing): one set, or one
    per FashionIQ category (each its own gallery)."""
    if data.DATASETS[s.dataset].protocol != "fashioniq":
        return [(s.dataset, data.dataset(s, split))]
    return [(c, data.dataset(SimpleNamespace(**{**vars(s), "categories": (c,)}), split)) for c in s.categories]


def _recalls(q, g, trips, protocol):
    """One set's recalls under its dataset's protocol (the module docstring)."""
    tr = trips.triplets
    refs, tgts = [t["reference"] for t in tr], [t["target"] for t in tr]
    if protocol == "fashioniq":
        return fashioniq_metrics(q, g, trips.images, tgts)
    if protocol == "shoes":
        return shoes_metrics(q, g, trips.images, refs, tgts)
    members = [t["members"] for t in tr] if all(t["members"] for t in tr) else None    # subsets if all
    return cirr_metrics(q, g, trips.images, refs, tgts, members)


# the score that picks best.pt, from a protocol's recalls
SCORE = {"cirr": lambda m: (m["R@5"] + m["Rsubset@1"]) / 2,
         "fashioniq": lambda m: (m["R@10"] + m["R@50"]) / 2,
         "shoes": lambda m: (m["R@1"] + m["R@10"] + m["R@50"]) / 3,
         "triplets": lambda m: sum(m[f"R@{k}"] for k in (1, 5, 10, 50)) / 4}


def evaluate_sets(enc, sets, dataset, feats=None):
    """Validation metrics of the model on [(name, ImageSource, triplets)] and avg (SCORE). CIRR: R@K,
    Rsubset@K, avg = (R@5 + Rsubset@1)/2. FashionIQ: per category '<cat>_R@10', '<cat>_R@50', their means
    'R@10', 'R@50', avg their mean. Shoes: R@1, R@10, R@50, avg their mean. Your own triplets: CIRR's
    protocol over the images of the split (Rsubset@K where every row has a subset), avg the mean of
    R@1/5/10/50. feats: an optional dict that receives each set's (query, gallery) features."""
    protocol, out = data.DATASETS[dataset].protocol, {}
    for name, images, trips in sets:
        q, g = query_features(enc, images, trips)
        if feats is not None:
            feats[name] = (q, g)
        m = _recalls(q, g, trips, protocol)
        out.update({f"{name}_{k}": v for k, v in m.items()} if protocol == "fashioniq" else m)
    if protocol == "fashioniq":                           # the mean over the categories
        for k in ("R@10", "R@50"):
            out[k] = sum(out[f"{n}_{k}"] for n, _, _ in sets) / len(sets)
    out["avg"] = SCORE[protocol](out)
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



MOVED = {"--audit": "python audit.py --checkpoint RUN/best.pt", "--query": "python search.py --query ...",
         "--queries": "python search.py --queries ...", "--gallery": "python search.py --gallery ..."}


def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--checkpoint", default=None, help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", default=None, help="zero-shot: OpenAI CLIP name or path, sum fusion")
    p.add_argument("--dataset", default=None, choices=list(data.DATASETS))
    p.add_argument("--data-root", default=None)
    p.add_argument("--categories", nargs="+", default=None)
    p.add_argument("--split", default=None, help="val (test for Shoes, which has no val), or test1 for "
                   "CIRR's server files")
    p.add_argument("--transform", default=None, choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--submission", default=None, help="folder for CIRR's test-server files (--split test1)")
    p.add_argument("--show", type=int, default=0, help="write a PNG grid of N queries with their top-5")
    p.add_argument("--out", default=None, help="metrics JSON file (default next to the checkpoint; "
                   "zero-shot: none unless given)")
    argv = sys.argv[1:] if argv is None else argv
    for flag in (x.split("=")[0] for x in argv):
        if flag in MOVED:
            p.error(f"{flag} has its own command now: {MOVED[flag]}")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.clip and not a.dataset:
        p.error("--clip needs --dataset (and --data-root for cirr / fashioniq / shoes)")
    if a.clip:       # the dataset and its folder first: a bad --data-root stops before CLIP is downloaded
        runtime.data_root(a.data_root, a.dataset)
    model, run_args, _, path = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    path = None if a.clip else path
    dataset = a.dataset or run_args["dataset"]
    spec = data.DATASETS[dataset]
    preset = vars(runtime.defaults(dataset))
    root = runtime.data_root(a.data_root or run_args.get("data_root"), dataset)
    categories = a.categories or run_args.get("categories") or preset["categories"]
    transform_name = a.transform or run_args.get("transform") or preset["transform"]
    amp, _ = runtime.autocast(run_args.get("amp", "auto"), device)    # the run's precision: as its log
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    a.split = a.split or spec.eval_split
    s = SimpleNamespace(dataset=dataset, data_root=root, categories=categories, skip_missing=a.skip_missing)
    transform = make_transform(transform_name, model.clip.image_resolution)
    sets = [(name, ImageSource.files(ds, transform), ds) for name, ds in eval_sets(s, a.split)]
    if dataset == "toy" and a.split == "test1" and not a.submission:   # the toy keeps its answers aside
        sets = [(name, images, toy.with_answers(ds, root)) for name, images, ds in sets]
    elif spec.protocol == "cirr" and a.split.startswith("test"):
        return submission(enc, sets[0], a)
    if any(t["target"] is None for _, _, trips in sets for t in trips.triplets):
        raise SystemExit(f"error: the {dataset} {a.split} split has no public targets; evaluate on --split val")

    feats = {}
    metrics = evaluate_sets(enc, sets, dataset, feats)
    width = max(map(len, metrics))
    cats = f" ({', '.join(categories)})" if spec.protocol == "fashioniq" else ""
    print(f"{dataset} {a.split}{cats}")
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
        exclude = None if spec.protocol == "fashioniq" else trips.ref_idx[:n]
        top = topk(q[:n], g, 5, exclude=exclude)
        rows = [(trips.paths[t["reference"]], t["text"],
                 [(trips.paths[trips.images[j]], trips.images[j] == t["target"]) for j in row])
                for t, row in zip(trips.triplets[:n], top.tolist())]
        grid = (out or Path(".") / "metrics.json").with_name(f"show_{dataset}_{a.split}.png")
        plots.query_grid(rows, grid)
        print(f"query grid written to {grid}")
    return metrics


# -----------------------------------------------------------------------------
# your own query: a reference image and a text against a folder of images







# -----------------------------------------------------------------------------
# the picture of --query and --queries



def submission(enc, val_set, a):
    """CIRR's test1 split (no public targets): the two server files, written into --submission and
    checked."""
    if not a.submission:
        raise SystemExit(f"error: the {a.split} split has no public targets; pass --submission DIR to write "
                         f"the CIRR evaluation server's files")
    _, images, trips = val_set
    q, g = query_features(enc, images, trips)
    tr = trips.triplets
    refs, pairids = [t["reference"] for t in tr], [t["pairid"] for t in tr]
    top50, top3 = cirr_rankings(q, g, trips.images, refs, [t["members"] for t in tr])
    paths = write_submission(a.submission, pairids, top50, top3)
    for sub, metric, k in zip(paths, ("recall", "recall_subset"), (min(50, len(trips.images) - 1), 3)):
        check_submission(sub, pairids, refs, metric, k)
    print(f"wrote and checked {len(pairids)} queries: " + ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
