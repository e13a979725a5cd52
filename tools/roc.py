"""Where the noise filter's decision sits on each view's ROC, for a run trained with known noise.

    python -m tools.roc runs/study/ncl-n0.5-s0        # the run's last.pt, its training split
    python -m tools.roc runs/X --views query text change --fpr 0.01 0.02 0.05

For every view: the share of each corrupted field (reference, text, target) flagged when the
threshold on the view's loss is set, with the truth, so that a given share of the clean pairs is
flagged (--fpr): the best any threshold on that view can do. Beside it, the decision the filter
takes without the truth (nfb.decide_views with the run's settings: w < 0.5) and the shares it flags.
The gap between the two says whether a view needs a better score (its ROC) or a better threshold
(its GMM).
"""

import argparse
import sys
from pathlib import Path

import torch

import audit
import data
import runtime
from encode import Encoder
from nfb import VIEWS

FIELDS = ("clean", "reference", "text", "target")       # triplets.noise_field's codes 0..3

def shares(flagged, field):
    """% of each field's pairs flagged. flagged (n,) bool, field (n,) int codes -> ' / '-joined."""
    return " / ".join(f"{100 * flagged[field == k].float().mean():5.1f}" if (field == k).any()
                      else "    —" for k in range(len(FIELDS)))

def main(argv=None):
    """-> ({(view, fpr): flagged (n,) bool}, the decision's flagged (n,) bool)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder holding last.pt, trained with injected noise")
    p.add_argument("--views", nargs="+", default=None, choices=VIEWS,
                   help="default: the run's --nfb-views")
    p.add_argument("--fpr", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                   help="shares of clean pairs flagged")
    p.add_argument("--data-root", default=None,
                   help="the dataset's folder, if it moved since training")
    a = p.parse_args(argv)
    ckpt_path = Path(a.run) / "last.pt"
    if not ckpt_path.is_file():
        sys.exit(f"error: {ckpt_path} does not exist; pass a run folder of train.py")
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    run_args = ckpt["args"]
    s = audit.audit_settings(run_args, run_args["dataset"], a.data_root or run_args["data_root"])
    views = a.views or list(s["nfb_views"])
    s["nfb_views"] = views if views[0] == "query" else ["query", *views]
    trips = data.dataset(argparse.Namespace(**s), "train")
    if not trips.noisy.any():
        sys.exit(f"error: {a.run}'s training triplets hold no known noise (--noise, or a noisy "
                 f"key): nothing to score against")
    model = runtime.build_model(ckpt).eval()
    enc = Encoder(model, 256, torch.device("cpu"), 0)
    out = audit.audit_scores(enc, audit.split_images(trips, s, enc), trips, s)
    field, clean = trips.noise_field.long(), trips.noise_field == 0
    res = {}
    print(f"\n{a.run}: {len(trips):,} training pairs, {int((~clean).sum()):,} noisy; % flagged of "
          f"{' / '.join(FIELDS)}")
    for name in s["nfb_views"]:
        loss = out["views"][name].float()
        for fpr in a.fpr:
            thr = torch.quantile(loss[clean], 1 - fpr)                # the truth sets the threshold
            res[name, fpr] = loss > thr                               # (n,) flagged
            print(f"  {name:7s} threshold at {100 * fpr:4.1f}% of the clean pairs: "
                  f"{shares(loss > thr, field)}")
        own = shares(out["view_w"][name] < 0.5, field)
        print(f"  {name:7s} its own GMM and gate (w < 0.5):   {own}")
    decision = shares(out["w"] < 0.5, field)
    print(f"  the decision of {' + '.join(s['nfb_views'])} (w < 0.5): {decision}")
    return res, out["w"] < 0.5

if __name__ == "__main__":
    main()
