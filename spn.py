"""SPN (Feng, Zhang, Nie, ACM MM 2024): contrastive learning with more negatives and more positives.

More negatives (stage 2, `python train.py --stage 2 --init RUN/best.pt`): freeze the image side (tower and image WCB
heads, train.freeze), compute once the normalised target feature of every training image (the bank) and each
image's reference feature f_ref (encode.ImageSource.features), and train the text side with NCE over the whole
bank (train.train_step): every training image is a negative of every query. The NFB's soft labels of stage 1 carry
over when both stages see the same triplets (nfb.NoiseFilter.carry_over).

More positives (`python spn.py ...`, this file): new training triplets made from images. Each source image (every
unique training image, or with --references-only the training references) is paired with a target drawn at random
from a window of its image-similarity ranking: rank 1 is the most similar *other* image (cosine of CLIP image
features, or of a trained run's target-role WCB features with --checkpoint; the source itself excluded, ties by
gallery order), and the window LO..HI (inclusive) skips near-duplicates and unrelated images alike. The modification
text comes from the two images' captions through a small set of templates chosen at random. SPN captions the
images with an MLLM; here the captions are an input file {image name: caption}, so any captioner can produce it (the
toy benchmark ships exact ones in image_captions.json). FashionIQ pairs images within each category. The output is
what `train.py --extra-triplets FILE` reads: a JSON list of {reference, target, text} (+ category for FashionIQ).

    python spn.py --dataset toy --checkpoint runs/X/best.pt --out extra.json
    python spn.py --dataset cirr --data-root DIR --captions caps.json --clip ViT-B/32 --out extra.json
    python spn.py --dataset triplets --data-root DIR --captions caps.json --checkpoint runs/X/best.pt --out extra.json
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
import toy
from encode import Encoder, ImageSource, encode_images

from preprocess import make_transform


# -----------------------------------------------------------------------------
# more positives: triplets drawn from a window of the similarity ranking, texts from captions

TEMPLATES = ("{tgt} instead of {ref}", "Unlike {ref}, I want {tgt}", "{tgt}", "change {ref} to {tgt}",
             "{tgt}, not {ref}")


def clean(caption):
    return caption.strip().rstrip(".").strip()  # "A dog." -> "A dog": templates add their own punctuation


def missing_captions(names, captions):
    return [n for n in names if n not in captions]


def generate_triplets(feats, names, captions, window=(10, 50), per_image=1, seed=0, templates=TEMPLATES,
                      queries=None):
    """feats (N, D) image features of `names` (any scale: cosine is taken); captions {name: str} for every name.
    queries: indices of the source images (default all N). Each source gets `per_image` distinct targets drawn
    uniformly from its similarity ranks lo..hi (1 = the nearest other image). Returns [{reference, target, text}]."""
    n = len(names)
    if len(feats) != n:
        raise ValueError(f"generate_triplets: {len(feats)} feature rows for {n} names")
    miss = missing_captions(names, captions)
    if miss:
        raise ValueError(f"{len(miss)} of {n} images have no caption, e.g. {miss[:5]}; add them to the captions "
                         f"file or pass --skip-missing-captions")
    lo, hi = window
    if hi > n - 1:
        print(f"window {lo}..{hi} clipped to {lo}..{n - 1}: only {n - 1} other images", flush=True)
        hi = n - 1
    if not 1 <= lo <= hi or not 1 <= per_image <= hi - lo + 1:
        raise ValueError(f"window {lo}..{hi} with {n} images cannot give {per_image} target(s) per image: need "
                         f"1 <= LO <= HI <= {n - 1} and --per-image <= HI - LO + 1")
    q = torch.arange(n) if queries is None else torch.as_tensor(queries, dtype=torch.long)
    feats = feats.float()
    # Ranking as evaluation does it: chunked matrix products, the source dropped, stable sort (ties by index).
    top = evaluate.topk(feats[q], feats, hi, exclude=q)                  # (Q, hi) nearest first
    win = top[:, lo - 1:]                                                # (Q, W) the window
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(win.shape, generator=g).argsort(1)[:, :per_image]  # (Q, K) distinct positions per row
    tgt = win.gather(1, pick)                                            # (Q, K)
    rng = random.Random(seed)
    caps = {k: clean(v) for k, v in captions.items()}
    out = []
    for i, row in zip(q.tolist(), tgt.tolist()):
        for j in row:
            text = rng.choice(templates).format(ref=caps[names[i]], tgt=caps[names[j]])
            out.append(dict(reference=names[i], target=names[j], text=text))
    return out


def read_captions(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found: pass --captions FILE, a JSON object "
                                f"{{image name: caption}} (any captioner can write it)")
    try:
        caps = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"captions file {path} is not valid JSON ({e})") from None
    if not isinstance(caps, dict) or not all(isinstance(v, str) for v in caps.values()):
        raise ValueError(f"captions file {path}: expected a JSON object {{image name: caption string}}")
    return caps


def main(argv=None):
    p = util.ArgumentParser(__doc__)
    p.add_argument("--dataset", default="toy", choices=["toy", "cirr", "fashioniq", "shoes", "triplets"],
                   help="the benchmark, or triplets: your own (the images of its train.jsonl)")
    p.add_argument("--data-root", default=None, help="dataset folder (toy: the default toy set if omitted)")
    p.add_argument("--captions", default=None, help="JSON {image name: caption}, names as the dataset writes them "
                   "(triplets: paths relative to --data-root; toy: <root>/image_captions.json)")
    p.add_argument("--out", required=True, help="output JSON, for train.py --extra-triplets")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--clip", default=None, help="image features from CLIP: OpenAI name or state-dict path")
    m.add_argument("--checkpoint", default=None, help="image features from a trained run (target-role feature)")
    p.add_argument("--window", type=int, nargs=2, default=[10, 50], metavar=("LO", "HI"),
                   help="similarity ranks to draw targets from (1 = nearest other image), inclusive")
    p.add_argument("--per-image", type=int, default=1, help="generated triplets per source image")
    p.add_argument("--references-only", action="store_true", help="sources: training references, not all images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", nargs="+", default=list(data.FIQ_CATEGORIES), help="FashionIQ categories")
    p.add_argument("--skip-missing-captions", action="store_true", help="leave out images without a caption")
    p.add_argument("--skip-missing", action="store_true", help="leave out images missing on disk")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    if not (a.clip or a.checkpoint):
        raise SystemExit("error: image similarities need a model: pass --clip NAME_OR_PATH or --checkpoint "
                         "RUN/best.pt (for the toy, a trained checkpoint: a random tiny CLIP ranks at random)")
    root = str(toy.toy_root(a.data_root)) if a.dataset == "toy" else a.data_root
    if not root:
        raise SystemExit(f"error: --dataset {a.dataset} needs --data-root DIR")
    if not Path(root).is_dir():                                # before a CLIP is loaded (or downloaded)
        raise SystemExit(f"error: --data-root {root}: no such folder; pass the {a.dataset} dataset folder")
    if not a.captions and a.dataset != "toy":
        raise SystemExit(f"error: --captions FILE is required for --dataset {a.dataset} (JSON {{image name: "
                         "caption})")
    captions = read_captions(a.captions or Path(root) / "image_captions.json")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run_args, _, _ = runtime.load_model(a.checkpoint, a.clip, a.dataset, device)
    transform_name = run_args.get("transform")
    preset = runtime.defaults(a.dataset)
    s = argparse.Namespace(**{**vars(preset), "data_root": root, "categories": a.categories, "noise": 0.0,
                              "skip_missing": a.skip_missing})
    gallery = data.dataset(s, "train")
    transform = make_transform(transform_name or preset.transform, model.clip.image_resolution)
    if a.dataset == "fashioniq":
        pools = {c: gallery.category_images[c] for c in a.categories}  # pair garments of one category only
    else:                                                      # CIRR, the toy, Shoes: one pool
        pools = {None: gallery.images}
    enc = Encoder(model, a.batch_size, device, a.workers)
    _, feats = encode_images(enc, ImageSource.files(gallery, transform))                 # (N, D)
    feats = feats.cpu()

    triplets = []
    for cat, names in pools.items():
        miss = missing_captions(names, captions)
        if miss and a.skip_missing_captions:
            print(f"{len(miss)} of {len(names)} images{f' ({cat})' if cat else ''} have no caption: left out, "
                  f"e.g. {miss[:3]}", flush=True)
            names = [n for n in names if n in captions]
        refs = {t["reference"] for t in gallery.triplets if t.get("category") == cat}
        queries = [i for i, n in enumerate(names) if n in refs] if a.references_only else None
        idx = torch.tensor([gallery.index[n] for n in names])
        new = generate_triplets(feats[idx], names, captions, tuple(a.window), a.per_image, a.seed, queries=queries)
        triplets += [dict(t, category=cat) if cat else t for t in new]

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    util.atomic_write(out, json.dumps(triplets, indent=1))
    print(f"wrote {len(triplets)} generated triplets to {out} (window {a.window[0]}..{a.window[1]}, "
          f"{a.per_image} per image, seed {a.seed}); use: train.py --extra-triplets {out}. Examples:")
    for t in triplets[:3]:
        print(f"  {t['reference']} -> {t['target']}: {t['text']!r}")
    return triplets


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:   # bad input: one line, no traceback
        sys.exit(f"error: {util.error_line(e)}")
