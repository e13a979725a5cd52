"""Search a folder of images with your own query (a reference image and a modification text, or a
file of them), with a trained run's model or a released CLIP zero-shot. The folder's features are
kept (--cache-dir) while the folder and the model are unchanged.

    python search.py --checkpoint runs/X/best.pt --query a.jpg --text "red collar" --gallery DIR
    python search.py --checkpoint runs/X/best.pt --queries queries.jsonl --gallery DIR
    python search.py --clip ViT-B/32 --query photo.jpg --text "in blue" --gallery DIR   # zero-shot
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import encode
import plots
import runtime
import triplets
import util
from evaluate import _ranks, topk
from preprocess import make_transform

QUERIES_SHOWN = 3          # --queries: the queries whose hits are printed (all are in the .jsonl)

def search(a, device):
    """Each query's top hits in the folder printed best first, the path last (--queries: the first
    QUERIES_SHOWN queries; every query's hits and target rank go to a .jsonl); a picture of the
    first --show queries, a missed target at its row's end. The query image is never a hit;
    unreadable files are skipped and named; bad input stops before any model is loaded."""
    if not a.gallery or not Path(a.gallery).expanduser().is_dir():
        raise SystemExit(f"error: --gallery {a.gallery}: no such folder; pass the folder of "
                         "images to search")
    if a.query and a.text is None:
        raise SystemExit("error: --query needs --text, the modification text")
    if a.query and not a.text.strip():
        raise SystemExit('error: --text is empty: give the modification text, e.g. --text "with '
                         'a red collar"')
    qs = read_queries(a)
    gallery = Path(os.path.abspath(Path(a.gallery).expanduser()))
    if not encode.scan_folder(gallery):
        raise SystemExit(f"error: --gallery {gallery}: no image "
                         f"({', '.join(encode.IMAGE_SUFFIXES)}) in it or below it")
    model, run_args, _, source = runtime.load_model(a.checkpoint, a.clip, device=device)
    source = Path(source)
    out = Path(a.out) if a.out else (Path(".") if a.clip else source.parent) / (
        f"queries_{Path(a.queries).stem}.png" if a.queries else "query.png")
    transform_name = a.transform or run_args.get("transform", "clip")
    transform = make_transform(transform_name, model.clip.image_resolution)
    st = source.stat() if source.is_file() else None   # the model: its file (size, time), or a name
    model_id = [str(source.resolve()) if st else str(source), st and st.st_size,
                st and st.st_mtime_ns, transform_name, model.clip.image_resolution]
    enc = encode.Encoder(model, a.batch_size, device, a.workers)
    names, g, skipped, cache, hit = encode.folder_features(enc, gallery, transform, model_id,
                                                           a.cache_dir)
    print(f"gallery {gallery}: {len(names):,} images, features "
          f"{'read from' if hit else 'computed and kept in'} {cache} (delete it to recompute)")
    if skipped:
        print(f"gallery {gallery}: {len(skipped)} unreadable file{'s' * (len(skipped) > 1)} "
              f"skipped: {', '.join(skipped[:5])}"
              + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    paths = [gallery / n for n in names]
    index = {str(p): i for i, p in enumerate(paths)}
    refs = [str(ref) for ref, _, _ in qs]           # the query images, batched as a split's images
    trips = SimpleNamespace(images=refs, paths=dict(zip(refs, refs)), ref_idx=torch.arange(len(qs)),
                            triplets=[dict(text=t) for _, t, _ in qs])
    q, _ = encode.query_features(enc, encode.ImageSource.files(trips, transform), trips)  # (Q, D)
    g = g.to(q.device)                       # the cache is read to the CPU; the queries the model's
    exclude = torch.tensor([index.get(str(ref), -1) for ref, _, _ in qs])    # the query image
    tgt = torch.tensor([index.get(str(t), -1) for _, _, t in qs])   # -1: none, or not in the folder
    top = topk(q, g, a.top, exclude=exclude)                                         # (Q, top)
    ranks = _ranks(q, g, tgt.clamp(min=0), exclude) + 1                              # (Q,) 1-based
    results, rows = [], []       # rows: the picture's, a target the hits missed last with its rank
    for k, ((ref, text, target), row) in enumerate(zip(qs, top.tolist())):
        sims = (F.normalize(q[k], dim=-1) @ g[row].T).tolist()
        t, rank = int(tgt[k]), int(ranks[k]) if tgt[k] >= 0 else None
        results.append(dict(reference=str(ref), text=text, target=target and str(target),
                            target_rank=rank, hits=[dict(path=str(paths[j]), similarity=round(s, 6))
                                                    for j, s in zip(row, sims)]))
        if k < (QUERIES_SHOWN if a.queries else 1):
            print(f"query {ref}: {text!r}" + (f" (target rank {rank:,})" if rank else ""))
            for n, h in enumerate(results[-1]["hits"], start=1):
                print(f"  {n:>3}  {h['similarity']:.4f}  {h['path']}")
        if k < (a.show or 8):
            rows.append((ref, text, [(paths[j], j == t) for j in row],
                         (target, rank) if target and t not in row else None))
    with_target = [r for r in results if r["target"]]
    hits = sum(r["target_rank"] is not None and r["target_rank"] <= a.top for r in with_target)
    if a.queries:
        util.atomic_write(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in results))
        more = len(results) - QUERIES_SHOWN
        print(f"{len(results):,} queries" + (f", {more:,} more than printed" if more > 0 else "")
              + f": every query's hits in {out.with_suffix('.jsonl')}")
    if with_target:
        lost = sum(r["target_rank"] is None for r in with_target)
        print(f"target within the top {a.top}: {hits} of {len(with_target)} queries "
              f"({100 * hits / len(with_target):.1f}%)"
              + (f"; {lost} targets are not in the folder" if lost else ""))
    plots.query_grid(rows, out)
    print(f"picture of {len(rows)} quer{'ies' if len(rows) > 1 else 'y'} written to {out}"
          + (" (--show N for more)" if len(results) > len(rows) else ""))
    return dict(hits=hits, queries=len(qs), with_target=len(with_target), top=top, names=names,
                results=results, skipped=skipped, picture=out)

def read_queries(a):
    """[(reference path, text, target path or None)] of --query / --queries, paths absolute and
    normalised; every query image readable and every text given, or one line naming the row."""
    if a.queries:
        file = Path(a.queries).expanduser()
        if not file.is_file():
            raise SystemExit(f"error: --queries {a.queries}: no such file; one JSON object a line "
                             "with reference, text (and target)")
        norm = lambda n: Path(os.path.abspath(file.parent / str(n)))     # paths from its folder
        rows = [(norm(row.get("reference", "")), str(row.get("text", "")).strip(),
                 norm(row["target"]) if row.get("target") else None, f"{a.queries} row {r}")
                for r, row in triplets.read_rows(file)]
    else:
        query = Path(os.path.abspath(Path(a.query).expanduser()))
        rows = [(query, a.text.strip(), None, "--query")]
    for ref, text, _, where in rows:
        if not text:
            raise SystemExit(f"error: {where}: no text; every query needs a reference image and "
                             "a text")
        try:
            triplets.load_image(ref)
        except OSError as e:
            raise SystemExit(f"error: {where}: cannot read the query image {ref} "
                             f"({type(e.__cause__ or e).__name__}); pass an image file") from None
    return [r[:3] for r in rows]

def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--checkpoint", help="a run's best.pt (default: the most recent run's)")
    p.add_argument("--clip", help="zero-shot: OpenAI CLIP name or path, sum fusion")
    p.add_argument("--query", help="a reference image (with --text)")
    p.add_argument("--text", help="--query: the modification text")
    p.add_argument("--queries", help="a .jsonl of {reference, text, target?}, paths from its dir")
    p.add_argument("--gallery", help="a folder of images (any depth) to search")
    p.add_argument("--top", type=int, default=5, help="hits per query")
    p.add_argument("--show", type=int, default=8, help="queries drawn in the picture")
    p.add_argument("--out", help="the picture, hits beside it as .jsonl (default: query.png or "
                   "queries_<file>.png beside the checkpoint; zero-shot: in the working directory)")
    p.add_argument("--cache-dir", default="~/.cache/ncl-cir/galleries", help="folder features")
    p.add_argument("--transform", choices=["clip", "targetpad"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    if not (a.query or a.queries):
        p.error("pass --query IMAGE --text TEXT, or --queries FILE, with --gallery DIR")
    if a.top < 1 or a.show < 1:
        p.error(f"--top {a.top} / --show {a.show}: at least 1 hit and 1 query to show")
    return search(a, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
