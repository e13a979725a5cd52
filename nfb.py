"""Noise-pair Filter Block (NFB) of NCL-CIR (Gao et al., ICASSP 2025, arXiv 2504.04339).

The paper fits a Gaussian Mixture Model to the distribution of per-pair losses, predicts which training pairs are
noisy (mismatched or partly matched: they keep a high loss) and turns that into the soft labels of L^soft_NCE
(loss.py). The recipe follows DivideMix / NCR: min-max normalise the losses, fit a 2-component 1-D GMM with few
iterations (max_iter=10, tol=1e-2, reg_covar=5e-4), soft label w_i = p(low-mean component | loss_i).

Our choices (the paper is silent):
- Deterministic start: sort the losses and split them in halves; each component starts at its half's mean and
  variance (+ reg_covar), weights 1/2. scikit-learn gets the same start (means_init / weights_init /
  precisions_init) instead of its random k-means, so both backends run the same EM path and the fit is
  reproducible.
- backend="torch" is a pure-torch EM in float64 on the losses' device that replicates scikit-learn's
  GaussianMixture step by step (reg_covar added to the variances, nk + 10 eps, stop when the mean
  log-likelihood changes by < tol, final E-step): posteriors agree with scikit-learn to ~1e-12.
- Degenerate inputs (< 10 losses, NaN/inf, all equal) give w = 1 with a warning, never an exception.
- The gate (is_noise): a 2-component GMM always finds two components, also in a clean loss distribution. Every
  w stays 1 unless the second mode looks like noise: two Gaussians must beat one Gamma by `gate` nats per pair
  (second_mode's excess), and the noisy component must be `width` times wider than the clean one.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loss import gallery_nce, text_nce
from model import compose

MAX_ITER, TOL, REG_COVAR = 10, 1e-2, 5e-4
MIN_SAMPLES = 10


def _degenerate(x):
    """Why the 1-D tensor x cannot be fitted, or None."""
    if x.numel() < MIN_SAMPLES:
        return f"only {x.numel()} losses (need >= {MIN_SAMPLES})"
    if not torch.isfinite(x).all():
        return "NaN/inf among the losses"
    if x.max() == x.min():
        return "all losses are equal"
    return None


def minmax(losses):
    """losses (N,) any float dtype/device -> (N,) float64 in [0, 1] (left as is when degenerate)."""
    x = losses.detach().reshape(-1).double()
    return x if _degenerate(x) else (x - x.min()) / (x.max() - x.min())


def _init(x):
    """Deterministic start from the halves of the sorted data. x (N,) float64 -> means, vars, weights (2,)."""
    s = x.sort().values
    lo, hi = s[: s.numel() // 2], s[s.numel() // 2:]
    means = torch.stack([lo.mean(), hi.mean()])
    var = torch.stack([lo.var(unbiased=False), hi.var(unbiased=False)]) + REG_COVAR
    return means, var, torch.full_like(means, 0.5)


def _e_step(x, means, var, weights):
    """-> mean log-likelihood (0-dim), log responsibilities (N, 2)."""
    lp = -0.5 * (math.log(2 * math.pi) + var.log() + (x[:, None] - means) ** 2 / var) + weights.log()  # (N, 2)
    norm = lp.logsumexp(dim=1)                                                                          # (N,)
    return norm.mean(), lp - norm[:, None]


def _em_torch(x, means, var, weights, max_iter, tol, reg_covar):
    lower_bound, converged, it = -math.inf, False, 0
    for it in range(1, max_iter + 1):
        prev = lower_bound
        ll, log_resp = _e_step(x, means, var, weights)
        resp = log_resp.exp()                                            # (N, 2)
        nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps              # (2,) as scikit-learn
        means = (resp * x[:, None]).sum(0) / nk
        var = (resp * (x[:, None] - means) ** 2).sum(0) / nk + reg_covar
        weights = nk / nk.sum()
        lower_bound = ll.item()          # scikit-learn's bound: log-likelihood of the E-step's parameters
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    resp = _e_step(x, means, var, weights)[1].exp()                      # final E-step, as fit + predict_proba
    return means, var, weights, resp, it, converged


def _em_sklearn(x, means, var, weights, max_iter, tol, reg_covar):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    X = x.cpu().numpy()[:, None]                                         # (N, 1) float64
    # init_params="random_from_data": the cheapest built-in start; it is overwritten by the three *_init
    gmm = GaussianMixture(2, tol=tol, reg_covar=reg_covar, max_iter=max_iter, init_params="random_from_data",
                          random_state=0, weights_init=weights.cpu().numpy(),
                          means_init=means.cpu().numpy()[:, None],
                          precisions_init=(1 / var).cpu().numpy()[:, None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 10 iterations is the recipe, not a failure
        gmm.fit(X)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=x.device)
    return (t(gmm.means_[:, 0]), t(gmm.covariances_.reshape(2)), t(gmm.weights_), t(gmm.predict_proba(X)),
            int(gmm.n_iter_), bool(gmm.converged_))


def fit_gmm(x, backend="sklearn", max_iter=MAX_ITER, tol=TOL, reg_covar=REG_COVAR):
    """2-component 1-D GMM on normalised losses x (N,). Components are sorted, index 0 = low mean = clean; the
    posterior of a loss below the clean mean is that of the mean (so w never rises with the loss).
    -> dict(means (2,), stds (2,), weights (2,) float64 CPU; clean (N,) float32 posterior of component 0 on
    x's device; n_iter, converged). Degenerate x: warning, NaN parameters and clean = 1."""
    if backend not in ("sklearn", "torch"):
        raise ValueError(f"nfb.py: backend must be 'sklearn' or 'torch', got {backend!r}")
    x = x.detach().reshape(-1).double()
    why = _degenerate(x)
    if why is None:
        means, var, weights, resp, n_iter, converged = (_em_torch if backend == "torch" else _em_sklearn)(
            x, *_init(x), max_iter, tol, reg_covar)
        # w must not rise with the loss: left of the clean mean, a wider noisy component can out-weigh the clean
        # one again, and the easiest pairs would get a lower w than middling ones; they get the clean mean's w
        resp = _e_step(torch.maximum(x, means.min()), means, var, weights)[1].exp()          # (N, 2)
        why = None if torch.isfinite(resp).all() else "the EM produced NaN posteriors"
    if why is not None:
        warnings.warn(f"nfb.py: cannot fit the noise GMM ({why}); using w = 1 (every pair clean)")
        nan = torch.full((2,), math.nan, dtype=torch.float64)
        return dict(means=nan, stds=nan.clone(), weights=nan.clone(), n_iter=0, converged=False,
                    clean=torch.ones(x.numel(), device=x.device))
    order = [0, 1] if means[0] <= means[1] else [1, 0]
    return dict(means=means[order].cpu(), stds=var[order].sqrt().cpu(), weights=weights[order].cpu(),
                clean=resp[:, order[0]].float(), n_iter=n_iter, converged=converged)


def gamma_loglik(losses):
    """Mean log-likelihood per sample of the maximum-likelihood Gamma(a, theta) fit to positive losses (N,): the
    model of a single skewed mode. Shape a by Newton's method on log(a) - digamma(a) = log(mean) - mean(log),
    from Minka's closed-form start; theta = mean / a."""
    x = losses.detach().reshape(-1).double().clamp(min=1e-12)
    m, lm = x.mean().item(), x.log().mean().item()
    s = math.log(m) - lm                                                 # > 0 unless all losses are equal
    if not s > 1e-12:
        return math.nan
    a = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(10):
        t = torch.tensor(a, dtype=torch.float64)
        a = max(a - (math.log(a) - torch.digamma(t).item() - s) / (1 / a - torch.polygamma(1, t).item()), 1e-6)
    theta = m / a
    return (a - 1) * lm - m / theta - a * math.log(theta) - math.lgamma(a)


def second_mode(losses, x, fit):
    """Is there a second mode at all, or did the GMM cut one skewed mode in two? losses (N,) the raw losses, x (N,)
    their min-max normalisation the GMM was fitted to. Returns
      excess    mean log-likelihood per sample of the two Gaussians minus that of one Gamma (both on the raw
                losses): a clean loss distribution is one skewed mode, which a Gamma fits about as well as two
                Gaussians (excess ~ 0); noise adds a mode the Gamma cannot follow (excess > 0)
      width     s1 / s0, the noisy component's std over the clean one's: label noise adds a *wide* mode (a wrong
                target lands anywhere in the ranking), while a clean distribution that grows a second hump with
                training (hard against easy edits) splits into two components of about the same width"""
    x = x.detach().reshape(-1).double().cpu()
    m, sd, pi = fit["means"], fit["stds"], fit["weights"]
    lp = -0.5 * (math.log(2 * math.pi) + (sd ** 2).log() + (x[:, None] - m) ** 2 / sd ** 2) + pi.log()  # (N, 2)
    span = (losses.max() - losses.min()).double().item()                 # density on x -> density on losses
    ll_gmm = lp.logsumexp(1).mean().item() - math.log(span)
    return dict(excess=ll_gmm - gamma_loglik(losses.cpu()), width=(sd[1] / sd[0]).item())


def is_noise(mode, gate, width):
    """The gate: does the second mode look like noise? mode: second_mode's dict. It must beat one Gamma by `gate`
    nats per pair (0: no test) and be at least `width` times wider than the clean mode (0: no test)."""
    return (gate <= 0 or mode["excess"] >= gate) and (width <= 0 or mode["width"] >= width)


def decide(losses, backend="sklearn"):
    """One view's GMM on finite per-sample losses (N,): min-max normalise, fit, measure the second mode (the gate's
    input; decide_views applies the gate). -> dict(w (N,) float32 on losses' device: p(clean | loss_i), 1 everywhere
    on degenerate input; x the normalised losses; fit; mode: second_mode's statistics)."""
    x = minmax(losses)
    fit = fit_gmm(x, backend)
    fitted = math.isfinite(fit["means"][0])
    mode = second_mode(losses, x, fit) if fitted else dict(excess=math.nan, width=math.nan)
    return dict(w=fit["clean"].to(losses.device), x=x, fit=fit, mode=mode)


def detection_metrics(w, noisy):
    """Noise detection quality. w (N,) clean probabilities, noisy (N,) bool ground truth. Positive = noisy,
    score = 1 - w for ROC-AUC; precision/recall of the decision w < 0.5. Undefined values are NaN."""
    from sklearn.metrics import roc_auc_score
    w, noisy = w.detach().float().cpu(), noisy.bool().cpu()
    flagged = w < 0.5
    tp = (flagged & noisy).sum().item()
    auc = roc_auc_score(noisy.numpy(), (1 - w).numpy()) if 0 < noisy.sum() < noisy.numel() else math.nan
    return dict(auc=float(auc), precision=tp / flagged.sum().item() if flagged.any() else math.nan,
                recall=tp / noisy.sum().item() if noisy.any() else math.nan)


# -----------------------------------------------------------------------------
# the views: what the GMM is fitted to

VIEWS = ("query", "text", "change", "subset", "gain")   # --nfb-views; the first one used is always "query"


@dataclass
class PairFeatures:
    """Features of every pair of a triplet set, computed once per refit (no gradient). The texts are the distinct
    ones: many pairs share a text."""
    f_txt: torch.Tensor          # (U, D) text features of the distinct texts (unnormalised)
    text_idx: torch.Tensor       # (n,) each pair's row of f_txt
    f_ref: torch.Tensor          # (n, D) each pair's reference feature (unnormalised)
    gallery: torch.Tensor        # (N, D) normalised target-role features of every image of the split
    tgt_idx: torch.Tensor        # (n,) each pair's target row of gallery
    ref_idx: torch.Tensor        # (n,) each pair's reference row of gallery (removed from its ranking)
    subsets: torch.Tensor | None = None   # (n, M) gallery rows of each pair's subset, target first, -1 padding


def pair_views(pf, names, tau, text_temp=0.25, inverted=True):
    """The views `names` (VIEWS) of every pair -> {name: (n,) losses}, each high for a suspect pair:
      query   l^gallery_i: the composed query q_i = normalize(f_txt_i + f_ref_i) ranked over the whole gallery, its
              reference removed (loss.gallery_nce). Blind to a wrong text on a true edit: q_i still finds t_i.
      text    l^text_i: which distinct text best explains (reference, target) (loss.text_nce, at tau * text_temp;
              inverted: each text's scores normalised over the pairs first)
      change  the text against the visual change normalize(t_i - normalize(f_ref_i)): -log softmax over the texts
      subset  near misses: -log softmax of the target among the pair's subset (CIRR's img_set), the same q_i;
              left out where the dataset has no subsets (FashionIQ, Shoes)
      gain    how much the text helps: l^gallery of q_i minus that of the reference alone, normalize(f_ref_i)"""
    q = compose(pf.f_txt[pf.text_idx.to(pf.f_txt.device)], pf.f_ref)                    # (n, D) the queries
    t = pf.gallery[pf.tgt_idx.to(pf.gallery.device)]                                     # (n, D)
    out = {}
    for name in names:
        if name == "query":
            out[name] = gallery_nce(q, pf.gallery, pf.tgt_idx, tau, exclude=pf.ref_idx)
        elif name == "text":
            out[name] = text_nce(pf.f_txt, pf.f_ref, t, pf.text_idx, tau * text_temp, inverted)
        elif name == "change":
            change = F.normalize(t - F.normalize(pf.f_ref, dim=-1), dim=-1)              # (n, D)
            logits = F.normalize(pf.f_txt, dim=-1) @ change.T / (tau * text_temp)         # (U, n)
            out[name] = -logits.log_softmax(0).gather(0, pf.text_idx[None].to(logits.device)).squeeze(0)
        elif name == "subset" and pf.subsets is not None:
            m = pf.subsets.to(q.device)                                                   # (n, M)
            sims = torch.einsum("nd,nmd->nm", q, pf.gallery[m.clamp(min=0)]) / tau
            out[name] = -sims.masked_fill(m < 0, float("-inf")).log_softmax(1)[:, 0]
        elif name == "gain":
            alone = gallery_nce(F.normalize(pf.f_ref, dim=-1), pf.gallery, pf.tgt_idx, tau, exclude=pf.ref_idx)
            out[name] = gallery_nce(q, pf.gallery, pf.tgt_idx, tau, exclude=pf.ref_idx) - alone
        elif name != "subset":
            raise ValueError(f"nfb.py: unknown view {name!r}; choose among {', '.join(VIEWS)}")
    return out


def decide_views(views, decision, backend="sklearn", gate=0.0, width=0.0, gate_by="first", prior=None, budget=0.0):
    """The NFB's decision on several views of the same n pairs. views {name: (n,) losses} (NaN: pair not seen, it
    keeps its prior weight), decision: the names the decision uses, the first one the query view. Every view gets
    its GMM (decide); the gate (gate_by="first"): the first view says whether there is noise at all (is_noise, both
    tests), then every view whose noisy component is the wider one takes part; gate_by="each": every view passes
    both tests on its own. A pair's w is the smallest of its decision views' (any view that finds it noisy flags
    it). budget > 0, with the gate open: spend_budget flags that share of the pairs the decision keeps as well.
    -> (w (n,), {name: (w_v (n,), decide's dict, seen (n,) bool, finite losses)}) for every view given."""
    per_view = {}
    for name, losses in views.items():
        losses = losses.detach().reshape(-1)
        seen = torch.isfinite(losses)                                    # (n,)
        fin = losses[seen].float()                                       # (n_seen,)
        per_view[name] = (decide(fin, backend), seen, fin)               # the GMM, not yet gated
    # A later view never opens the gate on its own: early in training the text view of clean data can show a wide
    # second mode (edits the model has not learnt yet)
    noise = is_noise(per_view[decision[0]][0]["mode"], gate, width)
    w = None
    for name, (d, seen, fin) in per_view.items():
        own = is_noise(d["mode"], gate, width) if gate_by == "each" else noise and is_noise(d["mode"], 0, width)
        d["mode"]["gated"] = not own
        w_v = (torch.ones(len(seen)) if prior is None else prior).to(seen.device, torch.float32, copy=True)
        w_v[seen] = torch.ones_like(d["w"]).to(seen.device) if not own else d["w"].to(seen.device)
        per_view[name] = (w_v, d, seen, fin)
        if name in decision:
            w = w_v if w is None else torch.minimum(w, w_v)
    if budget > 0 and noise:
        w = spend_budget(w, {k: views[k] for k in decision}, budget)
    return w, per_view


def spend_budget(w, views, budget):
    """Beyond the decision w (n,), flag (w = 0) the budget share of the pairs it keeps (w >= 0.5, every view finite)
    that rank highest by any view: score_i = max over views of the pair's rank among the kept pairs' losses. Why:
    each view's GMM puts its threshold where its clean Gaussian ends, which flags 0.1-0.4% of the clean pairs while
    the text view's score could flag 85-90% of the swapped texts at 1-2% of them (python -m tools.roc)."""
    kept = (w >= 0.5) & torch.stack([torch.isfinite(v.to(w.device)) for v in views.values()]).all(0)   # (n,)
    idx = kept.nonzero().squeeze(1)
    k = int(budget * len(idx))
    if k == 0:
        return w
    ranks = torch.stack([v.to(w.device)[idx].argsort().argsort() for v in views.values()])            # (V, n_kept)
    w = w.clone()
    w[idx[ranks.max(0).values.topk(k).indices]] = 0.0
    return w


# -----------------------------------------------------------------------------
# the training state

class NoiseFilter:
    """Training state of the NFB. Epochs are 0-based: epochs < warmup_epochs train with plain InfoNCE.
    Call update(views, epoch) with the per-pair losses of each view measured after epoch `epoch` ({name: (n,)}, or
    one tensor: the query view): every view in `views` gets its own GMM and gate (decide), a pair's soft label is
    the smallest of its views' (any view that finds it noisy flags it), and, when epoch + 1 is past the warm-up,
    the labels are installed for epoch + 1. Views given but not in `views` are only logged (their AUC and flags).
    Losses that are NaN (pair not seen this epoch, e.g. drop_last) keep their previous weight."""

    def __init__(self, n, warmup_epochs=1, backend="sklearn", noisy_gt=None, gate=0.0, width=0.0, views=("query",),
                 gate_by="first"):
        if backend not in ("sklearn", "torch"):
            raise ValueError(f"nfb.py: backend must be 'sklearn' or 'torch', got {backend!r}")
        self.n, self.warmup_epochs, self.backend = n, warmup_epochs, backend
        self.gate, self.width = gate, width                              # is_noise's two tests
        self.views = tuple(views)                                        # the views the decision uses
        self.gate_by = gate_by                                           # "first" view, or "each" on its own
        self.budget = 0.0       # spend_budget's share, set by train.build from --nfb-budget (decide_views)
        self.weights = torch.ones(n)                                     # (n,) soft labels, 1 before any fit
        # ground truth, where known: a flag per pair, or what was corrupted (0 = clean, k > 0: field k)
        gt = None if noisy_gt is None else torch.as_tensor(noisy_gt).reshape(-1).cpu()
        self.gt_field = gt.long() if gt is not None and gt.dtype != torch.bool else None
        self.noisy_gt = None if gt is None else gt.bool()
        if self.noisy_gt is not None and self.noisy_gt.numel() != n:
            raise ValueError(f"nfb.py: noisy_gt has {self.noisy_gt.numel()} flags for {n} training pairs")
        self.history = []                                                # one stats dict per update

    def active(self, epoch):
        """True when epoch `epoch` trains with the soft labels (past the warm-up)."""
        return epoch >= self.warmup_epochs

    def update(self, views, epoch):
        """views {name: (n,) per-pair losses} (or one (n,) tensor: the query view) of epoch `epoch` -> stats dict
        (also appended to .history): the decision's fields, and per view (view_<name>_*) its fit, AUC, flags."""
        views = views if isinstance(views, dict) else {"query": views}
        missing = [v for v in self.views if v not in views]
        if missing:
            raise ValueError(f"nfb.py: the decision needs the views {missing}, got {list(views)}")
        if any(v.numel() != self.n for v in views.values()):
            raise ValueError(f"nfb.py: got {[v.numel() for v in views.values()]} losses for {self.n} training pairs")
        w, per_view = decide_views(views, self.views, self.backend, self.gate, self.width, self.gate_by, self.weights,
                                   self.budget)
        applied = self.active(epoch + 1)
        if applied:
            self.weights = w
        w_q, d, seen, fin = per_view[self.views[0]]
        x, fit = d["x"], d["fit"]
        # means/stds are in min-max normalised units; loss_min/loss_max map them back to raw losses
        stats = dict(epoch=epoch, applied=applied, n_seen=int(seen.sum()), means=fit["means"].tolist(),
                     loss_min=float(fin.min()) if fin.numel() else math.nan,
                     loss_max=float(fin.max()) if fin.numel() else math.nan,
                     stds=fit["stds"].tolist(), mix=fit["weights"].tolist(), n_iter=fit["n_iter"],
                     n_noisy=int((w < 0.5).sum()), mean_w=float(w.float().mean()), **d["mode"])
        stats.update(self._truth(w))
        if self.noisy_gt is not None:
            # the loss itself as a noise score, whatever the GMM and the gate make of it
            stats["loss_auc"] = detection_metrics(1 - x.float(), self.noisy_gt[seen.cpu()])["auc"]
        for name, (w_v, d, seen, fin) in per_view.items():
            v = dict(n_noisy=int((w_v < 0.5).sum()), **d["mode"])
            v.update(self._truth(w_v))
            if self.noisy_gt is not None:
                v["loss_auc"] = detection_metrics(1 - d["x"].float(), self.noisy_gt[seen.cpu()])["auc"]
            stats.update({f"view_{name}_{k}": val for k, val in v.items()})
        self.history.append(stats)
        return stats

    def _truth(self, w):
        """Detection against the ground truth, where known: AUC, precision, recall, % flagged per corrupted field."""
        out = {}
        if self.noisy_gt is not None:
            out.update(detection_metrics(w, self.noisy_gt))
        if self.gt_field is not None:                                    # % flagged of each corrupted field
            f = self.gt_field
            out["flagged_by_field"] = [100 * (w.cpu()[f == k] < 0.5).float().mean().item() if (f == k).any()
                                       else None for k in range(int(f.max()) + 1)]
        return out

    def draw(self, generator):
        """--soft-label sample: keep pair i with probability w_i for one epoch -> (n,) bool."""
        return torch.rand(self.n, generator=generator) < self.weights.cpu()

    def carry_over(self, sd):
        """SPN's stage 2: start from stage 1's soft labels (sd: its state_dict, of the same training triplets),
        used from the first epoch on, without a warm-up."""
        if sd["n"] != self.n:
            raise ValueError(f"nfb.py: stage 1's noise filter has {sd['n']} pairs, this run {self.n}")
        self.weights = sd["weights"].float().clone()
        self.warmup_epochs = 0

    def state_dict(self):
        """Plain tensors and python types only: torch.load(weights_only=True) reads it back."""
        return dict(n=self.n, warmup_epochs=self.warmup_epochs, backend=self.backend, gate=self.gate,
                    width=self.width, views=list(self.views), gate_by=self.gate_by, weights=self.weights.cpu(),
                    noisy_gt=self.noisy_gt, gt_field=self.gt_field, history=list(self.history))

    def load_state_dict(self, sd):
        if sd["n"] != self.n:
            raise ValueError(f"nfb.py: checkpoint has a noise filter for {sd['n']} pairs, this run has {self.n}")
        self.warmup_epochs, self.backend = sd["warmup_epochs"], sd["backend"]
        self.weights, self.noisy_gt, self.history = sd["weights"].float(), sd["noisy_gt"], list(sd["history"])
        self.gate, self.width, self.gt_field = sd["gate"], sd["width"], sd["gt_field"]
        self.views, self.gate_by = tuple(sd["views"]), sd["gate_by"]
