"""Evaluation: the official CIRR and FashionIQ protocols, Shoes as its papers evaluate it, your own
triplets (CIRR's protocol), CIRR's server files, the CLI. Cosine-similarity ranking in chunks
(memory O(chunk x gallery)); ties go to the image earlier in the gallery (a stable sort).

- FashionIQ (val): per category, gallery = the category's val images; Recall@10/50.
- CIRR (val): gallery = the split's images, each query's reference removed *before* any metric;
  Recall@1/5/10/50; Recall_subset@1/2/3: the full ranking restricted to img_set.members minus the
  reference (your own triplets: where every row has a subset). test1: the server's two files.
- Shoes (test; no val split): gallery = the 4,658 images of eval_im_names.txt, the reference
  removed; Recall@1/10/50. A query whose reference is its target (one in test) is a miss at every
  K, as in TG-CIR's, DQU-CIR's and COMBINER's code.

    python evaluate.py                                 # best.pt of the most recent run in runs/
    python evaluate.py --checkpoint runs/X/best.pt     # dataset, root, model from the checkpoint
    python evaluate.py --clip ViT-B/32 --dataset cirr --data-root DIR   # zero-shot CLIP, sum fusion
    python evaluate.py --checkpoint runs/X/best.pt --split test1 --submission subs/  # CIRR server
    python evaluate.py --clip RN50x4 --dataset shoes --data-root DIR    # Shoes: its test split
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
import util
from encode import Encoder, ImageSource, check_finite, query_features
from loss import CHUNK, drop_reference, rank_of, similarities
from preprocess import make_transform

# -----------------------------------------------------------------------------
# ranking: every query against the whole gallery, in chunks

def _ranked(q, g, exclude=None, chunk=CHUNK):
    """(start, sims) per chunk of queries: sims (C, G) the cosine similarities of queries
    start..start+C to the gallery, each query's exclude (Q,) image removed (loss.drop_reference)."""
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
    """(Q, k) indices of the k gallery items (G, D) nearest each query (Q, D), best first; exclude
    (Q,) or None: an image per query to drop (the CIRR reference)."""
    k = min(k, len(gallery_feats) - (exclude is not None))    # an excluded image never fills a list
    return torch.cat([torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k].cpu()
                      for _, sims in _ranked(query_feats, gallery_feats, exclude, chunk)])

def _ranks(q, g, tgt, exclude=None, chunk=CHUNK):
    """0-based rank of each query's target (Q,) over the gallery, its exclude image removed."""
    return torch.cat([rank_of(sims, tgt[s:s + len(sims)].to(sims.device)).cpu()
                      for s, sims in _ranked(q, g, exclude, chunk)])

def _recall(ranks, ks, name="R", hit=True):
    """{name@K: percent of queries whose target ranks in the top K} from 0-based ranks (Q,)."""
    return {f"{name}@{k}": 100.0 * ((ranks < k) & hit).double().mean().item() for k in ks}

# -----------------------------------------------------------------------------
# the protocols

def cirr_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names,
                 members=None, chunk=CHUNK):
    """CIRR recall (percent). query_feats (Q, D), gallery_feats (G, D); names are lists; members[i]:
    the query's img_set.members, reference included (the protocol removes it), of any size (the
    triplet format's), or members=None: no Recall_subset."""
    index = {n: i for i, n in enumerate(gallery_names)}
    ref = _lookup(index, reference_names, "reference images")                 # (Q,)
    tgt = _lookup(index, target_names, "target images")                       # (Q,)
    sub = None
    if members is not None:
        # members in gallery order keep the stable-sort tie rule; padding (-1) sorts first
        rows = [[index[m] for m in ms if m != r] for ms, r in zip(members, reference_names)]
        width = max(map(len, rows))
        sub = torch.tensor([r + [-1] * (width - len(r)) for r in rows]).sort(dim=1).values  # (Q, 5)
        is_tgt = sub == tgt[:, None]                                          # (Q, 5)
        if not is_tgt.any(1).all():
            raise ValueError("a target image is missing from its query's subset members")
        pos = is_tgt.long().argmax(1)                                 # (Q,) the target's column
    ranks, sub_ranks = [], []
    for s, sims in _ranked(query_feats, gallery_feats, ref, chunk):          # the reference removed
        ranks.append(rank_of(sims, tgt[s:s + len(sims)].to(sims.device)).cpu())
        if sub is not None:              # the ranking restricted to the subset; padding scores -inf
            m = sub[s:s + len(sims)].to(sims.device)                          # (C, 5)
            scores = sims.gather(1, m.clamp(min=0)).masked_fill(m < 0, float("-inf"))
            sub_ranks.append(rank_of(scores, pos[s:s + len(sims)].to(sims.device)).cpu())
    out = _recall(torch.cat(ranks), (1, 5, 10, 50))
    return out if sub is None else {**out, **_recall(torch.cat(sub_ranks), (1, 2, 3), "Rsubset")}

def fashioniq_metrics(query_feats, gallery_feats, gallery_names, target_names, chunk=CHUNK):
    """FashionIQ recall (percent) for one category: rank of the target among its val images."""
    tgt = _lookup({n: i for i, n in enumerate(gallery_names)}, target_names, "target images")
    return _recall(_ranks(query_feats, gallery_feats, tgt, chunk=chunk), (10, 50))

def shoes_metrics(query_feats, gallery_feats, gallery_names, reference_names, target_names,
                  chunk=CHUNK):
    """Shoes recall (percent) as TG-CIR's, DQU-CIR's and COMBINER's code: the reference removed, a
    self-pair (reference = target) a miss at every K (they set the reference's score to the
    minimum, keep the top 50 and divide by all queries). Shapes and names as cirr_metrics."""
    index = {n: i for i, n in enumerate(gallery_names)}
    ref = _lookup(index, reference_names, "reference images")             # (Q,)
    tgt = _lookup(index, target_names, "target images")                   # (Q,)
    ranks = _ranks(query_feats, gallery_feats, tgt, ref, chunk)           # (Q,)
    return _recall(ranks, (1, 10, 50), hit=ref != tgt)                 # a self-pair never counts

def format_metrics(m):
    return " ".join(f"{k} {v:.2f}" for k, v in m.items() if "_" not in k)

# -----------------------------------------------------------------------------
# validation: the evaluation sets of a run's settings and their metrics

def eval_sets(s, split):
    """[(name, triplets)] of the settings s (dataset, data_root, categories, skip_missing): one
    set, or one per category where each has its own gallery (FashionIQ)."""
    if not data.DATASETS[s.dataset].per_category:
        return [(s.dataset, data.dataset(s, split))]
    return [(c, data.dataset(SimpleNamespace(**{**vars(s), "categories": (c,)}), split))
            for c in s.categories]

# a protocol's recalls of one set: (q, g, gallery names, references, targets, members or None)
METRICS = {"cirr": cirr_metrics, "triplets": cirr_metrics,
           "fashioniq": lambda q, g, names, refs, tgts, _: fashioniq_metrics(q, g, names, tgts),
           "shoes": lambda q, g, names, refs, tgts, _: shoes_metrics(q, g, names, refs, tgts)}

# the score that picks best.pt, from a protocol's recalls (FashionIQ's: of the categories' means)
SCORE = {"cirr": lambda m: (m["R@5"] + m["Rsubset@1"]) / 2,
         "fashioniq": lambda m: (m["R@10"] + m["R@50"]) / 2,
         "shoes": lambda m: (m["R@1"] + m["R@10"] + m["R@50"]) / 3,
         "triplets": lambda m: sum(m[f"R@{k}"] for k in (1, 5, 10, 50)) / 4}

def evaluate_sets(enc, sets, dataset, feats=None):
    """Validation metrics of the model on [(name, ImageSource, triplets)] (METRICS), and avg
    (SCORE). Per category (FashionIQ): '<cat>_R@K' and R@K their mean. feats: an optional dict
    that receives each set's (query, gallery) features."""
    spec, out = data.DATASETS[dataset], {}
    for name, images, trips in sets:
        q, g = query_features(enc, images, trips)
        if feats is not None:
            feats[name] = (q, g)
        tr = trips.triplets
        members = [t["members"] for t in tr] if all(t["members"] for t in tr) else None
        m = METRICS[spec.protocol](q, g, trips.images, [t["reference"] for t in tr],
                                   [t["target"] for t in tr], members)       # subsets if all
        out.update({f"{name}_{k}": v for k, v in m.items()} if spec.per_category else m)
    if spec.per_category:                                 # the mean over the categories
        out.update({k: sum(out[f"{n}_{k}"] for n, _, _ in sets) / len(sets) for k in m})
    out["avg"] = SCORE[spec.protocol](out)
    return out

# -----------------------------------------------------------------------------
# CIRR test server files

def write_submission(out_dir, pairids, top50, top3, tag="ncl-cir"):
    """Write the two files CIRR's server takes: recall (top-50 names per pairid, reference
    excluded) and recall_subset (top-3 names within the subset). -> their paths."""
    paths = []
    for metric, tops in (("recall", top50), ("recall_subset", top3)):
        paths.append(Path(out_dir) / f"{metric}_submission_{tag}.json")
        sub = {str(p): list(t) for p, t in zip(pairids, tops)}
        util.atomic_write(paths[-1], json.dumps({"version": "rc2", "metric": metric, **sub}))
    return paths

def check_submission(path, pairids, references, metric, k):
    """Check a server file: version, metric, every pairid with k distinct names, no query's
    reference in its own list, under the server's 5 MB limit. ValueError at the first problem."""
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
            raise ValueError(f"{path}: pairid {p} has {len(names)} names "
                             f"({len(set(names))} distinct), needs {k}")
        if r in names:
            raise ValueError(f"{path}: pairid {p} lists its own reference image {r}")
    if len(sub) != len(pairids) + 2:
        raise ValueError(f"{path}: {len(sub) - 2} entries for {len(pairids)} queries")

def cirr_rankings(q, g, gallery_names, references, members):
    """Top-50 names (reference removed) and top-3 within the subset (members minus reference)."""
    index = {n: i for i, n in enumerate(gallery_names)}
    top = topk(q, g, 50, exclude=_lookup(index, references, "reference images"))   # (Q, 50)
    top50 = [[gallery_names[j] for j in row] for row in top.tolist()]
    # subset members in gallery order, so ties fall as in the full ranking (stable sort)
    sub = torch.tensor([sorted(index[m] for m in ms if m != r)
                        for ms, r in zip(members, references)], device=q.device)      # (Q, 5)
    sims = torch.einsum("qd,qkd->qk", F.normalize(q.float(), dim=-1),
                        F.normalize(g.float(), dim=-1)[sub])                           # (Q, 5)
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :3]     # (Q, 3)
    return top50, [[gallery_names[j] for j in row] for row in sub.gather(1, order).cpu().tolist()]

def submission(enc, test_set, a):
    """CIRR's test1 split (no public targets): the two server files, in --submission, checked."""
    if not a.submission:
        raise SystemExit(f"error: the {a.split} split has no public targets; pass --submission DIR "
                         f"to write the CIRR evaluation server's files")
    _, images, trips = test_set
    q, g = query_features(enc, images, trips)
    refs, pairids = [t["reference"] for t in trips.triplets], [t["pairid"] for t in trips.triplets]
    top50, top3 = cirr_rankings(q, g, trips.images, refs, [t["members"] for t in trips.triplets])
    paths = write_submission(a.submission, pairids, top50, top3)
    for sub, metric, k in zip(paths, ("recall", "recall_subset"), (min(50, len(g) - 1), 3)):
        check_submission(sub, pairids, refs, metric, k)
    print(f"wrote and checked {len(pairids)} queries: " + ", ".join(map(str, paths)))
    return paths

SERVER = {"cirr": submission}    # the protocols whose test split is scored by a server's files

# -----------------------------------------------------------------------------
# command line

MOVED = {"--audit": "python audit.py --checkpoint RUN/best.pt",
         **{f: f"python search.py {f} ..." for f in ("--query", "--queries", "--gallery")}}

def main(argv=None):
    p = util.ArgumentParser(__doc__)
    runtime.model_flags(p)
    p.add_argument("--split", help="val (Shoes: test), or test1 for CIRR's server files")
    p.add_argument("--transform", choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--submission", help="folder for CIRR's test-server files (--split test1)")
    p.add_argument("--show", type=int, default=0, help="write a PNG grid of N queries, their top-5")
    p.add_argument("--out", help="metrics JSON (default: beside the checkpoint; zero-shot: none)")
    argv = sys.argv[1:] if argv is None else argv
    for flag in (x.split("=")[0] for x in argv):
        if flag in MOVED:
            p.error(f"{flag} has its own command now: {MOVED[flag]}")
    a = p.parse_args(argv)
    if a.clip:       # the dataset and its folder first: a bad --data-root stops before CLIP loads
        data.data_root(a.data_root, a.dataset or p.error(
            "--clip needs --dataset (and --data-root for cirr / fashioniq / shoes)"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run, _, path = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    dataset = a.dataset or run["dataset"]
    spec, preset = data.DATASETS[dataset], vars(runtime.defaults(dataset))
    root = data.data_root(a.data_root or run.get("data_root"), dataset)
    s = SimpleNamespace(dataset=dataset, data_root=root, skip_missing=a.skip_missing,
                        categories=a.categories or run.get("categories") or preset["categories"])
    amp, _ = runtime.autocast(run.get("amp", "auto"), device)    # the run's precision
    enc = Encoder(model, a.batch_size, device, a.workers, amp)
    transform = make_transform(a.transform or run.get("transform") or preset["transform"],
                               model.clip.image_resolution)
    a.split = a.split or spec.eval_split
    sets = [(name, ImageSource.files(ds, transform), ds) for name, ds in eval_sets(s, a.split)]
    test = a.split.startswith("test")                        # a split without public targets
    if test and spec.answers and not a.submission:           # the toy keeps its answers aside
        sets = [(name, images, spec.answers(ds, root)) for name, images, ds in sets]
    elif test and spec.protocol in SERVER:
        return SERVER[spec.protocol](enc, sets[0], a)
    if any(t["target"] is None for _, _, trips in sets for t in trips.triplets):
        raise SystemExit(f"error: the {dataset} {a.split} split has no public targets; "
                         "evaluate on --split val")
    feats = {}
    metrics = evaluate_sets(enc, sets, dataset, feats)
    print(f"{dataset} {a.split}" + (f" ({', '.join(s.categories)})" if spec.per_category else ""))
    for k, v in metrics.items():
        print(f"  {k:<{max(map(len, metrics))}}  {v:6.2f}")
    name = f"metrics_{dataset}_{a.split}.json"
    out = Path(a.out) if a.out else None if a.clip else path.with_name(name)
    if out:
        util.atomic_write(out, json.dumps(metrics, indent=1))
    print(f"metrics written to {out}" if out else
          "(zero-shot: pass --out FILE to save the metrics)")
    if a.show:
        name, images, trips = sets[0]
        q, g = feats[name]
        n = min(a.show, len(q))
        top = topk(q[:n], g, 5, exclude=None if spec.per_category else trips.ref_idx[:n])
        rows = [(trips.paths[t["reference"]], t["text"],
                 [(trips.paths[trips.images[j]], trips.images[j] == t["target"]) for j in row])
                for t, row in zip(trips.triplets[:n], top.tolist())]
        grid = (out or Path(".") / "metrics.json").with_name(f"show_{dataset}_{a.split}.png")
        plots.query_grid(rows, grid)
        print(f"query grid written to {grid}")
    return metrics

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
