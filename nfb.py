"""Noise-pair Filter Block (NFB) of NCL-CIR (Gao et al., ICASSP 2025, arXiv 2504.04339).

Noisy pairs (mismatched or partly matched) keep a high loss: a GMM fitted to the per-pair losses
gives w_i = p(low-mean component | loss_i), the soft labels of L^soft_NCE (loss.py), by DivideMix /
NCR's recipe: min-max normalised losses, 2-component 1-D GMM, max_iter=10, tol=1e-2, reg_covar=5e-4.
Ours, where the paper is silent:
- Deterministic start: each half of the sorted losses gives a component's mean, variance + reg_covar
  and weight 1/2; scikit-learn gets it too (*_init, not its random k-means): one reproducible EM.
- backend="torch": scikit-learn's GaussianMixture step by step, float64 on the losses' device
  (reg_covar, nk + 10 eps, stop when the mean log-likelihood moves < tol, final E-step): posteriors
  agree to ~1e-12. Degenerate inputs (< 10 losses, NaN/inf, all equal): w = 1 and a warning.
- The gate (is_noise): a 2-component GMM finds two components even in clean losses, so every w stays
  1 unless two Gaussians beat one Gamma by `gate` nats per pair and the noisy component is WIDTH
  times wider. Each view of a pair (pair_views) gets a GMM; w is the smallest (decide_views).
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loss import gallery_nce, text_nce
from model import compose

MAX_ITER, TOL, REG_COVAR, MIN_SAMPLES = 10, 1e-2, 5e-4, 10

def _degenerate(x):
    """Why the 1-D tensor x cannot be fitted, or None."""
    return (f"only {x.numel()} losses (need >= {MIN_SAMPLES})" if x.numel() < MIN_SAMPLES else
            "NaN/inf among the losses" if not torch.isfinite(x).all() else
            "all losses are equal" if x.max() == x.min() else None)

def minmax(losses):
    """losses (N,) any float dtype/device -> (N,) float64 in [0, 1] (as is when degenerate)."""
    x = losses.detach().reshape(-1).double()
    return x if _degenerate(x) else (x - x.min()) / (x.max() - x.min())

def _init(x):
    """Start from the sorted data's halves. x (N,) float64 -> means, vars, weights (2,)."""
    lo, hi = x.sort().values.split([x.numel() // 2, x.numel() - x.numel() // 2])
    means = torch.stack([lo.mean(), hi.mean()])
    var = torch.stack([lo.var(unbiased=False), hi.var(unbiased=False)]) + REG_COVAR
    return means, var, torch.full_like(means, 0.5)

def _e_step(x, means, var, weights):
    """-> mean log-likelihood (0-dim), log responsibilities (N, 2)."""
    lp = (-0.5 * (math.log(2 * math.pi) + var.log() + (x[:, None] - means) ** 2 / var)
          + weights.log())                                               # (N, 2)
    norm = lp.logsumexp(dim=1)                                           # (N,)
    return norm.mean(), lp - norm[:, None]

def _em_torch(x, means, var, weights, max_iter, tol, reg_covar):
    lower_bound, converged, it = -math.inf, False, 0
    for it in range(1, max_iter + 1):
        ll, log_resp = _e_step(x, means, var, weights)
        resp = log_resp.exp()                                            # (N, 2)
        nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps              # (2,) as scikit-learn
        means = (resp * x[:, None]).sum(0) / nk
        var = (resp * (x[:, None] - means) ** 2).sum(0) / nk + reg_covar
        weights = nk / nk.sum()
        prev, lower_bound = lower_bound, ll.item()      # sklearn's: of the E-step's parameters
        if converged := abs(lower_bound - prev) < tol:
            break
    return means, var, weights, it, converged

def _em_sklearn(x, means, var, weights, max_iter, tol, reg_covar):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    # init_params="random_from_data": the cheapest built-in start; the three *_init overwrite it
    gmm = GaussianMixture(2, tol=tol, reg_covar=reg_covar, max_iter=max_iter, random_state=0,
                          init_params="random_from_data", weights_init=weights.cpu().numpy(),
                          means_init=means.cpu().numpy()[:, None],
                          precisions_init=(1 / var).cpu().numpy()[:, None, None])
    with warnings.catch_warnings(action="ignore", category=ConvergenceWarning):  # 10 is the recipe
        gmm.fit(x.cpu().numpy()[:, None])                                # (N, 1) float64
    t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=x.device)
    return (t(gmm.means_[:, 0]), t(gmm.covariances_.reshape(2)), t(gmm.weights_),
            int(gmm.n_iter_), bool(gmm.converged_))

def fit_gmm(x, backend="sklearn", max_iter=MAX_ITER, tol=TOL, reg_covar=REG_COVAR):
    """2-component 1-D GMM on normalised losses x (N,), sorted: component 0 = low mean = clean.
    -> dict(means, stds, weights (2,) float64 CPU; clean (N,) float32 p(0 | x_i) on x's device;
    n_iter, converged). Degenerate x: warning, NaN parameters and clean = 1."""
    if backend not in ("sklearn", "torch"):
        raise ValueError(f"nfb.py: backend must be 'sklearn' or 'torch', got {backend!r}")
    x = x.detach().reshape(-1).double()
    why = _degenerate(x)
    if why is None:
        em = _em_torch if backend == "torch" else _em_sklearn
        means, var, weights, n_iter, converged = em(x, *_init(x), max_iter, tol, reg_covar)
        # the final E-step. w must not rise with the loss: left of the clean mean a wider noisy
        # component can win again, so the easiest pairs get the clean mean's w
        resp = _e_step(torch.maximum(x, means.min()), means, var, weights)[1].exp()  # (N, 2)
        why = None if torch.isfinite(resp).all() else "the EM produced NaN posteriors"
    if why is not None:
        warnings.warn(f"nfb.py: cannot fit the noise GMM ({why}); using w = 1 (every pair clean)")
        nan = torch.full((2,), math.nan, dtype=torch.float64)
        return dict(means=nan, stds=nan.clone(), weights=nan.clone(), n_iter=0, converged=False,
                    clean=torch.ones(x.numel(), device=x.device))
    o = [0, 1] if means[0] <= means[1] else [1, 0]                      # clean component first
    return dict(means=means[o].cpu(), stds=var[o].sqrt().cpu(), weights=weights[o].cpu(),
                clean=resp[:, o[0]].float(), n_iter=n_iter, converged=converged)

def gamma_loglik(losses):
    """Per-sample mean log-likelihood of the ML Gamma(a, theta) (one skewed mode) of losses (N,):
    Newton on log(a) - digamma(a) = log(mean) - mean(log) from Minka's start; theta = mean / a."""
    x = losses.detach().reshape(-1).double().clamp(min=1e-12)
    m, lm = x.mean().item(), x.log().mean().item()
    s = math.log(m) - lm                                         # > 0 unless all losses are equal
    if not s > 1e-12:
        return math.nan
    a = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(10):
        t = torch.tensor(a, dtype=torch.float64)
        step = (math.log(a) - torch.digamma(t).item() - s) / (1 / a - torch.polygamma(1, t).item())
        a = max(a - step, 1e-6)
    theta = m / a
    return (a - 1) * lm - m / theta - a * math.log(theta) - math.lgamma(a)

def second_mode(losses, x, fit):
    """Two modes, or one skewed mode cut in two? losses (N,) raw, x (N,) the GMM's input -> dict(
      excess  mean log-likelihood per sample, two Gaussians minus one Gamma (raw losses): ~0 for
              one skewed mode, > 0 when noise adds a mode a Gamma cannot follow
      width   s1 / s0, noisy over clean std: label noise adds a *wide* mode (a wrong target lands
              anywhere); a hump of hard edits grown in training is as wide)"""
    x = x.detach().reshape(-1).double().cpu()
    m, sd, pi = fit["means"], fit["stds"], fit["weights"]
    span = (losses.max() - losses.min()).double().item()         # density on x -> on losses
    ll_gmm = _e_step(x, m, sd ** 2, pi)[0].item() - math.log(span)
    return dict(excess=ll_gmm - gamma_loglik(losses.cpu()), width=(sd[1] / sd[0]).item())

def is_noise(mode, gate):
    """The gate on second_mode's dict: excess >= gate nats and width >= WIDTH; gate 0: no gate."""
    return gate <= 0 or mode["excess"] >= gate and mode["width"] >= WIDTH

def decide(losses, backend="sklearn"):
    """One view's GMM on finite losses (N,), ungated. -> dict(w (N,) float32 p(clean | loss_i) on
    losses' device, 1 when degenerate; x the normalised losses; fit; mode)."""
    x = minmax(losses)
    fit = fit_gmm(x, backend)
    mode = second_mode(losses, x, fit) if fit["n_iter"] else dict(excess=math.nan, width=math.nan)
    return dict(w=fit["clean"].to(losses.device), x=x, fit=fit, mode=mode)

def detection_metrics(w, noisy):
    """w (N,) clean probabilities, noisy (N,) bool truth. Positive = noisy: ROC-AUC of 1 - w,
    precision/recall of w < 0.5. NaN where undefined."""
    from sklearn.metrics import roc_auc_score
    w, noisy = w.detach().float().cpu(), noisy.bool().cpu()
    flagged = w < 0.5
    tp = (flagged & noisy).sum().item()
    auc = roc_auc_score(noisy, 1 - w) if 0 < noisy.sum() < noisy.numel() else math.nan
    return dict(auc=float(auc), precision=tp / flagged.sum().item() if flagged.any() else math.nan,
                recall=tp / noisy.sum().item() if noisy.any() else math.nan)

# -----------------------------------------------------------------------------
# the views: what the GMM is fitted to

VIEWS = ("query", "text", "change")     # --nfb-views; the first one is always "query"
TEXT_TEMP = 0.25      # the text views' temperature, a fraction of tau: is the text among the best?
WIDTH = 1.25          # the gate's second test: the noisy component this many times wider

@dataclass
class PairFeatures:
    """Every pair's features, computed once per refit (no gradient); the texts deduplicated."""
    f_txt: torch.Tensor          # (U, D) the distinct texts' features (unnormalised)
    text_idx: torch.Tensor       # (n,) each pair's row of f_txt
    f_ref: torch.Tensor          # (n, D) each pair's reference feature (unnormalised)
    gallery: torch.Tensor        # (N, D) normalised target-role features of the split's images
    tgt_idx: torch.Tensor        # (n,) each pair's target row of gallery
    ref_idx: torch.Tensor        # (n,) each pair's reference row of gallery (not ranked)

def pair_views(pf, names, tau):
    """The views `names` (VIEWS) of every pair -> {name: (n,) losses}, each high for a suspect pair:
      query   l^gallery_i (loss.gallery_nce): q_i over the gallery minus its reference; blind to a
              wrong text on a true edit (q_i still finds t_i)
      text    l^text_i (loss.text_nce) at tau * TEXT_TEMP: which text explains (reference, target)
      change  the same softmax over the texts, against normalize(t_i - normalize(f_ref_i))"""
    q = compose(pf.f_txt[pf.text_idx.to(pf.f_txt.device)], pf.f_ref)              # (n, D)
    t = pf.gallery[pf.tgt_idx.to(pf.gallery.device)]                               # (n, D)
    out = {}
    for name in names:
        if name == "query":
            out[name] = gallery_nce(q, pf.gallery, pf.tgt_idx, tau, exclude=pf.ref_idx)
        elif name == "text":
            out[name] = text_nce(pf.f_txt, pf.f_ref, t, pf.text_idx, tau * TEXT_TEMP)
        elif name == "change":
            change = F.normalize(t - F.normalize(pf.f_ref, dim=-1), dim=-1)        # (n, D)
            logits = F.normalize(pf.f_txt, dim=-1) @ change.T / (tau * TEXT_TEMP)  # (U, n)
            out[name] = -logits.log_softmax(0).gather(0, pf.text_idx[None].to(logits.device))[0]
        else:
            raise ValueError(f"nfb.py: unknown view {name!r}; choose among {', '.join(VIEWS)}")
    return out

# -----------------------------------------------------------------------------
# the decision: a GMM per view, the gate, the smallest w

@dataclass
class ViewFit:
    """One view's GMM over the n pairs, and what the gate made of it."""
    w: torch.Tensor              # (n,) p(clean | loss_i); the prior where not seen, 1 where gated
    x: torch.Tensor              # (n_seen,) the min-max normalised losses the GMM saw
    losses: torch.Tensor         # (n_seen,) the finite raw losses
    seen: torch.Tensor           # (n,) bool: the pair's loss is finite
    fit: dict                    # fit_gmm's means, stds, weights, n_iter
    mode: dict                   # second_mode's excess and width, and gated: the view is left out

def decide_views(views, decision, backend="sklearn", gate=0.0, prior=None):
    """The decision on views {name: (n,) losses} of n pairs (NaN: not seen, keeps its prior), a GMM
    each (decide); decision: the names used, query first. Gate: the query view says if there is
    noise (is_noise), then each view whose noisy component is the wider (WIDTH) joins; gate 0: no
    gate. w: a pair's smallest over the decision views (any flags) -> (w (n,), {name: ViewFit})"""
    fits = {}
    for name, losses in views.items():
        losses = losses.detach().reshape(-1)
        seen = torch.isfinite(losses)                                    # (n,)
        fin = losses[seen].float()                                       # (n_seen,)
        fits[name] = ViewFit(losses=fin, seen=seen, **decide(fin, backend))
    # a later view never opens the gate on its own: early in training the text view of clean data
    # can show a wide second mode (edits the model has not learnt yet)
    noise = is_noise(fits[decision[0]].mode, gate)
    for f in fits.values():
        joins = noise and (gate <= 0 or f.mode["width"] >= WIDTH)
        f.mode["gated"] = not joins
        w_v = torch.ones(len(f.seen)) if prior is None else prior
        w_v = w_v.to(f.seen.device, torch.float32, copy=True)           # (n,)
        w_v[f.seen] = f.w.to(f.seen.device) if joins else 1.0
        f.w = w_v
    return torch.stack([f.w for name, f in fits.items() if name in decision]).amin(0), fits

def report(w, fits, decision, truth=None):
    """The log fields of a decision: the query view's fit, the decision's flags (and detection where
    truth, a Truth, is known), then per view view_<name>_*: flags, gate statistics, detection."""
    q = fits[decision[0]]
    # means/stds are in min-max normalised units; loss_min/loss_max map them back to raw losses
    lo, hi = q.losses.aminmax() if q.losses.numel() else (math.nan, math.nan)
    stats = dict(n_seen=int(q.seen.sum()), means=q.fit["means"].tolist(), loss_min=float(lo),
                 loss_max=float(hi), stds=q.fit["stds"].tolist(), mix=q.fit["weights"].tolist(),
                 n_iter=q.fit["n_iter"], n_noisy=int((w < 0.5).sum()),
                 mean_w=float(w.float().mean()), **q.mode)
    if truth is not None:
        stats.update(truth.scores(w))
        stats["loss_auc"] = truth.loss_auc(q)   # the loss itself as a noise score, before the GMM
    for name, f in fits.items():
        v = dict(n_noisy=int((f.w < 0.5).sum()), **f.mode)
        if truth is not None:
            v.update(truth.scores(f.w), loss_auc=truth.loss_auc(f))
        stats.update({f"view_{name}_{k}": val for k, val in v.items()})
    return stats

@dataclass
class Truth:
    """Known noise of n pairs: flags, and the corrupted field (NOISE_FIELDS index, 0 clean)."""
    noisy: torch.Tensor                  # (n,) bool
    field: torch.Tensor | None = None    # (n,) long

    def scores(self, w):
        """Detection of the decision w < 0.5: AUC, precision, recall, % flagged per field."""
        out = detection_metrics(w, self.noisy)
        if self.field is not None:
            f, flagged = self.field, w.cpu() < 0.5
            out["flagged_by_field"] = [100 * flagged[f == k].float().mean().item()
                                       if (f == k).any() else None for k in range(int(f.max()) + 1)]
        return out

    def loss_auc(self, fit):
        return detection_metrics(1 - fit.x.float(), self.noisy[fit.seen.cpu()])["auc"]

def truth_of(noisy_gt, n):
    """Truth from a flag (bool) or the corrupted field (int) per pair; None when not known."""
    if noisy_gt is None:
        return None
    gt = torch.as_tensor(noisy_gt).reshape(-1).cpu()
    if gt.numel() != n:
        raise ValueError(f"nfb.py: noisy_gt has {gt.numel()} flags for {n} training pairs")
    return Truth(gt.bool(), None if gt.dtype == torch.bool else gt.long())

# -----------------------------------------------------------------------------
# the training state

class NoiseFilter:
    """Training state of the NFB; 0-based epochs < warmup_epochs train with InfoNCE. update decides
    on an epoch's losses (views not in `views` are only reported; NaN: not seen, weight kept) and,
    past the warm-up, installs the next epoch's labels."""

    def __init__(self, n, warmup_epochs=1, backend="sklearn", noisy_gt=None, gate=0.0,
                 views=("query",)):
        if backend not in ("sklearn", "torch"):
            raise ValueError(f"nfb.py: backend must be 'sklearn' or 'torch', got {backend!r}")
        self.n, self.warmup_epochs, self.backend = n, warmup_epochs, backend
        self.gate, self.views, self.truth = gate, tuple(views), truth_of(noisy_gt, n)
        self.weights, self.history = torch.ones(n), []   # (n,) soft labels; a stats dict per update

    def active(self, epoch):
        """True when epoch `epoch` trains with the soft labels (past the warm-up)."""
        return epoch >= self.warmup_epochs

    def update(self, views, epoch):
        """views {name: (n,) losses} (or the query view's) after `epoch` -> report, in .history."""
        views = views if isinstance(views, dict) else {"query": views}
        if missing := [v for v in self.views if v not in views]:
            raise ValueError(f"nfb.py: the decision needs the views {missing}, got {list(views)}")
        sizes = [v.numel() for v in views.values()]
        if any(s != self.n for s in sizes):
            raise ValueError(f"nfb.py: got {sizes} losses for {self.n} training pairs")
        w, fits = decide_views(views, self.views, self.backend, self.gate, self.weights)
        if applied := self.active(epoch + 1):
            self.weights = w
        stats = dict(epoch=epoch, applied=applied, **report(w, fits, self.views, self.truth))
        self.history.append(stats)
        return stats

    def draw(self, generator):
        """--soft-label sample: keep pair i with probability w_i for one epoch -> (n,) bool."""
        return torch.rand(self.n, generator=generator) < self.weights.cpu()

    def carry_over(self, sd):
        """SPN's stage 2: stage 1's soft labels (sd: its state_dict, same triplets) from epoch 0."""
        if sd["n"] != self.n:
            raise ValueError(f"nfb.py: stage 1's noise filter has {sd['n']} pairs, "
                             f"this run {self.n}")
        self.weights, self.warmup_epochs = sd["weights"].float().clone(), 0

    def state_dict(self):
        """Plain tensors and python types only: torch.load(weights_only=True) reads it back."""
        t = self.truth or Truth(None)                                    # no truth: both None
        return dict(n=self.n, warmup_epochs=self.warmup_epochs, backend=self.backend,
                    gate=self.gate, views=list(self.views), weights=self.weights.cpu(),
                    history=list(self.history), noisy_gt=t.noisy, gt_field=t.field)

    def load_state_dict(self, sd):
        if sd["n"] != self.n:
            raise ValueError(f"nfb.py: checkpoint has a noise filter for {sd['n']} pairs, "
                             f"this run has {self.n}")
        self.warmup_epochs, self.backend = sd["warmup_epochs"], sd["backend"]
        self.gate, self.views = sd["gate"], tuple(sd["views"])
        self.weights, self.history = sd["weights"].float(), list(sd["history"])
        self.truth = truth_of(sd["noisy_gt"] if sd["gt_field"] is None else sd["gt_field"], self.n)
