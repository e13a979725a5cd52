"""SPN (Feng, Zhang, Nie, ACM MM 2024): contrastive learning with more negatives and more positives.

More negatives: stage 2 (train.py --stage 2 --init RUN/best.pt: NCE over a bank of every training
image, the image side frozen). More positives, this file: each source image (every training image,
or --references-only the references) gets a target drawn at random from ranks LO..HI (inclusive) of
its similarity ranking, which skips near-duplicates and unrelated images alike (rank 1: the most
similar *other* image by CLIP features, or a run's target-role WCB features with --checkpoint; ties
by gallery order), and a text: the two images' captions in a random template. SPN captions with an
MLLM; here any captioner writes {image name: caption} (the toy ships exact ones). FashionIQ pairs
garments of one category. Writes what train.py --extra-triplets reads.

    python spn.py --dataset toy --checkpoint runs/X/best.pt --out extra.json
    python spn.py --dataset cirr --data-root DIR --captions caps.json --clip ViT-B/32 --out x.json
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import data
import evaluate
import runtime
import util
from encode import Encoder, ImageSource, encode_images
from preprocess import make_transform

TEMPLATES = ("{tgt} instead of {ref}", "Unlike {ref}, I want {tgt}", "{tgt}",
             "change {ref} to {tgt}", "{tgt}, not {ref}")

def missing_captions(names, captions):
    return [n for n in names if n not in captions]

def generate_triplets(feats, names, captions, window=(10, 50), per_image=1, seed=0,
                      templates=TEMPLATES, queries=None):
    """feats (N, D) features of `names` (any scale: cosine is taken), captions {name: str} of all;
    each source (queries: indices, default all N) gets `per_image` distinct targets drawn uniformly
    from its similarity ranks lo..hi (1: the nearest other image). -> [{reference, target, text}]"""
    n = len(names)
    if len(feats) != n:
        raise ValueError(f"generate_triplets: {len(feats)} feature rows for {n} names")
    if miss := missing_captions(names, captions):
        raise ValueError(f"{len(miss)} of {n} images have no caption, e.g. {miss[:5]}; add them to "
                         f"the captions file or pass --skip-missing-captions")
    lo, hi = window
    if hi > n - 1:
        print(f"window {lo}..{hi} clipped to {lo}..{n - 1}: only {n - 1} other images", flush=True)
        hi = n - 1
    if not 1 <= lo <= hi or not 1 <= per_image <= hi - lo + 1:
        raise ValueError(f"window {lo}..{hi} with {n} images cannot give {per_image} target(s) per "
                         f"image: need 1 <= LO <= HI <= {n - 1} and --per-image <= HI - LO + 1")
    q = torch.arange(n) if queries is None else torch.as_tensor(queries, dtype=torch.long)
    feats = feats.float()
    # ranked as evaluation ranks: chunked products, the source dropped, stable sort (ties by index)
    win = evaluate.topk(feats[q], feats, hi, exclude=q)[:, lo - 1:]      # (Q, W) ranks lo..hi
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(win.shape, generator=g).argsort(1)[:, :per_image]  # (Q, K) distinct per row
    rng = random.Random(seed)
    caps = {k: v.strip().rstrip(".").strip() for k, v in captions.items()}  # templates add the "."
    return [dict(reference=names[i], target=names[j],
                 text=rng.choice(templates).format(ref=caps[names[i]], tgt=caps[names[j]]))
            for i, row in zip(q.tolist(), win.gather(1, pick).tolist()) for j in row]  # (Q, K)

def read_captions(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"captions file {path} not found: pass --captions FILE, a JSON "
                                f"object {{image name: caption}} (any captioner can write it)")
    try:
        caps = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"captions file {path} is not valid JSON ({e})") from None
    if not isinstance(caps, dict) or not all(isinstance(v, str) for v in caps.values()):
        raise ValueError(f"captions file {path}: expected a JSON {{image name: caption string}}")
    return caps

def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--dataset", default="toy", choices=list(data.DATASETS),
                   help="the benchmark, or triplets: your own (the images of its train.jsonl)")
    p.add_argument("--data-root", help="dataset folder (toy: the default toy set if omitted)")
    p.add_argument("--captions", help="JSON {image name: caption}, names as the dataset's "
                   "(triplets: relative to --data-root; toy: <root>/image_captions.json)")
    p.add_argument("--out", required=True, help="output: JSON [{reference, target, text}]")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--clip", help="image features from CLIP: OpenAI name or state-dict path")
    m.add_argument("--checkpoint", help="image features from a trained run (target-role feature)")
    p.add_argument("--window", type=int, nargs=2, default=[10, 50], metavar=("LO", "HI"),
                   help="similarity ranks to draw targets from, inclusive (1 = the nearest)")
    p.add_argument("--per-image", type=int, default=1, help="generated triplets per source image")
    p.add_argument("--references-only", action="store_true", help="sources: the references only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", nargs="+", default=list(data.FIQ_CATEGORIES), help="FashionIQ's")
    p.add_argument("--skip-missing-captions", action="store_true", help="drop uncaptioned images")
    p.add_argument("--skip-missing", action="store_true", help="leave out images missing on disk")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    spec = data.DATASETS[a.dataset]
    if not (a.clip or a.checkpoint):
        sys.exit("error: image similarities need a model: --clip NAME_OR_PATH or --checkpoint "
                 "RUN/best.pt (the toy: a trained one; a random tiny CLIP ranks at random)")
    root = (str(spec.make_root(a.data_root)) if spec.make_root      # checked before a CLIP loads
            else data.data_root(a.data_root, a.dataset))
    if not a.captions and not spec.make_root:             # a generated folder ships its captions
        raise SystemExit(f"error: --captions FILE is required for --dataset {a.dataset} (JSON "
                         "{image name: caption})")
    captions = read_captions(a.captions or Path(root) / "image_captions.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run_args, _, _ = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    preset = runtime.defaults(a.dataset)
    gallery = data.dataset(argparse.Namespace(**{**vars(preset), "data_root": root, "noise": 0.0,
                           "categories": a.categories, "skip_missing": a.skip_missing}), "train")
    tf = make_transform(run_args.get("transform") or preset.transform, model.clip.image_resolution)
    enc = Encoder(model, a.batch_size, device, a.workers)
    feats = encode_images(enc, ImageSource.files(gallery, tf))[1].cpu()                  # (N, D)
    pools = ({c: gallery.category_images[c] for c in a.categories} if spec.per_category
             else {None: gallery.images})               # FashionIQ pairs garments of one category
    triplets = []
    for cat, names in pools.items():
        if a.skip_missing_captions and (miss := missing_captions(names, captions)):
            print(f"{len(miss)} of {len(names)} images{f' ({cat})' if cat else ''} have no "
                  f"caption: left out, e.g. {miss[:3]}", flush=True)
            names = [n for n in names if n in captions]
        refs = {t["reference"] for t in gallery.triplets if cat is None or t["category"] == cat}
        queries = [i for i, n in enumerate(names) if n in refs] if a.references_only else None
        new = generate_triplets(feats[[gallery.index[n] for n in names]], names, captions,
                                tuple(a.window), a.per_image, a.seed, queries=queries)
        triplets += [dict(t, category=cat) if cat else t for t in new]
    util.atomic_write(a.out, json.dumps(triplets, indent=1))
    print(f"wrote {len(triplets)} generated triplets to {a.out} (window {a.window[0]}.."
          f"{a.window[1]}, {a.per_image} per image, seed {a.seed}); use: train.py "
          f"--extra-triplets {a.out}. Examples:" + "".join(
              f"\n  {t['reference']} -> {t['target']}: {t['text']!r}" for t in triplets[:3]))
    return triplets

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
