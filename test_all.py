"""The test suite: `python -m pytest test_all.py`.

Every test checks real behaviour against an independent truth: OpenAI's CLIP code (`clip-anytorch`), scikit-learn,
hand-computed small cases, the real CIRR / FashionIQ annotation files in ../shared/data. No test downloads anything.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from loss import bank_nce, info_nce, soft_nce
from nfb import NoiseFilter, clean_probability, detection_metrics, fit_gmm, minmax
from wcb import WCB, diversity_penalty

# ====================================================================================================
# wcb.py, nfb.py, loss.py
# ====================================================================================================

def _qt(B=8, M=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(M or B, D, generator=g), dim=-1).requires_grad_()
    return q, t


# ----------------------------------------------------------------------------- loss.py

def test_soft_nce_w1_is_info_nce_and_cross_entropy():
    tau = 0.05
    q, t = _qt()
    ref = F.cross_entropy(q @ t.T / tau, torch.arange(8))
    gq_ref, gt_ref = torch.autograd.grad(ref, (q, t))
    for fn in (lambda: info_nce(q, t, tau), lambda: soft_nce(q, t, torch.ones(8), tau)):
        out = fn()
        gq, gt = torch.autograd.grad(out, (q, t))
        assert torch.allclose(out, ref, atol=1e-6)
        assert torch.allclose(gq, gq_ref, atol=1e-5) and torch.allclose(gt, gt_ref, atol=1e-5)
    per = soft_nce(q, t, torch.ones(8), tau, reduction="none")
    assert per.shape == (8,) and torch.allclose(per, info_nce(q, t, tau, reduction="none"), atol=1e-6)


def test_soft_nce_matches_dense_target_and_w0_is_uniform_over_others():
    tau, B, M = 0.1, 6, 10                      # M > B: targets gathered from other ranks, pos given
    q, t = _qt(B, M)
    pos = torch.tensor([3, 0, 9, 1, 5, 5])
    logits = q @ t.T / tau
    for w in (torch.rand(B, generator=torch.Generator().manual_seed(1)), torch.zeros(B)):
        dense = ((1 - w) / (M - 1))[:, None].expand(B, M).clone()
        dense[torch.arange(B), pos] = w
        ref = F.cross_entropy(logits, dense, reduction="none")
        assert torch.allclose(soft_nce(q, t, w, tau, pos=pos, reduction="none"), ref, atol=1e-5)
    # w = 0: exactly the mean of -log p over the other M - 1 targets
    logp = logits.log_softmax(1)
    other = torch.stack([torch.cat([logp[i, :pos[i]], logp[i, pos[i] + 1:]]).mean() for i in range(B)])
    assert torch.allclose(soft_nce(q, t, torch.zeros(B), tau, pos=pos, reduction="none"), -other, atol=1e-5)


def test_bank_nce_hand_computed():
    # q0 = (1, 0), q1 = (0, 1); bank rows (1, 0), (0, 1), (-1, 0); tau = 0.5
    # logits: q0 -> [2, 0, -2], q1 -> [0, 2, 0]; targets 0 and 1
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    idx = torch.tensor([0, 1])
    # loss0 = log(1 + e^-2 + e^-4) = 0.1429316...; loss1 = log(1 + 2 e^-2) = 0.2395448...
    hard = bank_nce(q, bank, idx, 0.5, reduction="none")
    assert torch.allclose(hard, torch.tensor([0.14293163, 0.23954477]), atol=1e-6)
    # soft, w = (0.5, 1): loss0 = -0.5 log p00 - 0.25 (log p01 + log p02)
    #   log Z0 = 2 + 0.1429316 = 2.1429316; log p = [-0.1429316, -2.1429316, -4.1429316]
    #   loss0 = 0.0714658 + 0.25 * 6.2858633 = 1.6429316; loss1 unchanged
    soft = bank_nce(q, bank, idx, 0.5, w=torch.tensor([0.5, 1.0]), reduction="none")
    assert torch.allclose(soft, torch.tensor([1.64293163, 0.23954477]), atol=1e-6)
    assert torch.allclose(bank_nce(q, bank, idx, 0.5), hard.mean())


def test_bank_nce_with_batch_targets_equals_info_nce():
    q, t = _qt(8)
    w = torch.rand(8)
    assert torch.allclose(bank_nce(q, t, torch.arange(8), 0.02), info_nce(q, t, 0.02), atol=1e-6)
    assert torch.allclose(bank_nce(q, t, torch.arange(8), 0.02, w=w), soft_nce(q, t, w, 0.02), atol=1e-6)


def test_losses_under_autocast_are_fp32_and_close():
    q, t = _qt(16, D=32)
    w = torch.rand(16)
    ref = [info_nce(q, t, 0.01), soft_nce(q, t, w, 0.01), bank_nce(q, t, torch.arange(16), 0.01, w=w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, tb = (q @ torch.eye(32)), (t @ torch.eye(32))   # bf16 activations, as from the model
        assert qb.dtype == torch.bfloat16
        out = [info_nce(qb, tb, 0.01), soft_nce(qb, tb, w, 0.01), bank_nce(qb, tb, torch.arange(16), 0.01, w=w)]
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and abs(o.item() - r.item()) < 0.05 * max(1.0, r.item())
    out[1].backward()                                       # gradients flow back to the fp32 leaves
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_loss_bad_input_messages():
    q, t = _qt(4)
    with pytest.raises(ValueError, match="loss.py"):
        info_nce(q, t[:, :3], 0.1)
    with pytest.raises(ValueError, match="loss.py"):
        soft_nce(q, t, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="loss.py"):
        info_nce(q, t[:2], 0.1)


# ----------------------------------------------------------------------------- nfb.py

def _bimodal(n, ratio, seed, gap=4.0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.rand(n, generator=g) < ratio
    clean = (torch.randn(n, generator=g) * 0.6).abs()           # clean pairs: small losses
    bad = gap + torch.randn(n, generator=g)                     # noisy pairs: around log(B)-ish
    return torch.where(noisy, bad, clean), noisy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_torch_em_matches_sklearn(seed, ratio):
    losses, noisy = _bimodal(4000, ratio, seed, gap=2.0 + seed)   # overlap varies with the seed
    x = minmax(losses)
    a, b = fit_gmm(x, "sklearn"), fit_gmm(x, "torch")
    assert (a["clean"] - b["clean"]).abs().max() < 1e-2
    assert ((a["clean"] < 0.5) == (b["clean"] < 0.5)).float().mean() >= 0.99
    for k in ("means", "stds", "weights"):
        assert torch.allclose(a[k], b[k], atol=1e-6)
    assert a["n_iter"] == b["n_iter"] and a["means"][0] < a["means"][1]
    if seed >= 1:                                                  # separated modes
        assert detection_metrics(b["clean"], noisy)["auc"] >= 0.95


def test_clean_probability_device_dtype():
    losses, noisy = _bimodal(500, 0.3, 0)
    for backend in ("sklearn", "torch"):
        w = clean_probability(losses.half(), backend)
        assert w.dtype == torch.float32 and w.shape == (500,) and 0 <= w.min() and w.max() <= 1
        assert w[~noisy].mean() > 0.9 and w[noisy].mean() < 0.1


@pytest.mark.parametrize("case", ["equal", "nan", "inf", "few", "empty"])
@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_degenerate_inputs_give_ones_and_warn(case, backend):
    x = {"equal": torch.full((100,), 2.5), "few": torch.rand(9), "empty": torch.zeros(0),
         "nan": torch.rand(100).index_fill(0, torch.tensor([3]), math.nan),
         "inf": torch.rand(100).index_fill(0, torch.tensor([7]), math.inf)}[case]
    with pytest.warns(UserWarning, match="nfb.py"):
        w = clean_probability(x, backend)
    assert w.shape == x.shape and (w == 1).all()


def test_detection_metrics_hand_made():
    w = torch.tensor([0.9, 0.8, 0.4, 0.2, 0.6, 0.1])
    noisy = torch.tensor([False, False, False, True, True, True])
    m = detection_metrics(w, noisy)
    # flagged (w < 0.5): items 2, 3, 5 -> tp = 2 -> precision 2/3, recall 2/3
    # scores 1 - w: noisy {0.8, 0.4, 0.9} vs clean {0.1, 0.2, 0.6}: 8 of 9 pairs ordered right -> auc 8/9
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(8 / 9)


def test_noise_filter_warmup_update_stats_and_state(tmp_path):
    losses, noisy = _bimodal(300, 0.3, 1)
    nf = NoiseFilter(300, warmup_epochs=2, backend="torch", noisy_gt=noisy)
    assert not nf.active(0) and not nf.active(1) and nf.active(2)
    s0 = nf.update(losses, 0)                       # labels for epoch 1: still warm-up
    assert not s0["applied"] and (nf.weights == 1).all()
    s1 = nf.update(losses, 1)                       # labels for epoch 2: installed
    assert s1["applied"] and (nf.weights < 0.5).sum() == s1["n_noisy"] > 0
    for k in ("means", "stds", "mix", "n_noisy", "auc", "precision", "recall", "epoch", "mean_w"):
        assert k in s1
    assert s1["auc"] > 0.95 and s1["means"][0] < s1["means"][1] and len(nf.history) == 2
    # unseen pairs (NaN loss) keep their weight
    prev = nf.weights.clone()
    part = losses.clone()
    part[:50] = math.nan
    nf.update(part, 2)
    assert torch.equal(nf.weights[:50], prev[:50]) and nf.history[-1]["n_seen"] == 250
    # round trip through a weights_only checkpoint
    torch.save({"nfb": nf.state_dict()}, tmp_path / "c.pt")
    nf2 = NoiseFilter(300)
    nf2.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["nfb"])
    assert torch.equal(nf2.weights, nf.weights) and nf2.history == nf.history
    assert nf2.warmup_epochs == 2 and nf2.backend == "torch" and torch.equal(nf2.noisy_gt, noisy)
    with pytest.raises(ValueError, match="nfb.py"):
        nf.update(losses[:10], 3)


# ----------------------------------------------------------------------------- wcb.py

def test_wcb_identity_at_init_and_padding_zero():
    torch.manual_seed(0)
    wcb = WCB(16, n_maps=3, hidden=8)
    x, g = torch.randn(4, 7, 16), torch.randn(4, 16)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] + [False] * 6, [True] * 5 + [False] * 2])
    f, pen, att = wcb(x, mask, g)
    assert torch.equal(f, g) and pen.dim() == 0 and att.shape == (4, 7)
    assert (att[~mask] == 0).all() and (att[mask] > 0).all()
    assert torch.allclose(att.sum(1), torch.ones(4))
    f2, _, att2 = wcb(x, None, g)                   # no mask: all tokens weighted
    assert torch.equal(f2, g) and (att2 > 0).all()
    mask[2] = False                                 # all padding (never produced): no NaN, uniform map
    f3, pen3, att3 = wcb(x, mask, g)
    assert torch.isfinite(att3).all() and torch.isfinite(pen3) and torch.allclose(att3[2], torch.full((7,), 1 / 7))


def test_diversity_penalty_disjoint_zero_identical_positive():
    disjoint = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]]])
    identical = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]])
    assert diversity_penalty(disjoint).item() == 0.0
    assert diversity_penalty(identical).item() == pytest.approx(2.0)   # K(K - 1)


def test_wcb_gradients_reach_alpha_and_scorer():
    torch.manual_seed(0)
    wcb = WCB(16)
    x, g = torch.randn(4, 5, 16), torch.randn(4, 16)
    f, pen, _ = wcb(x, None, g)
    (f.square().sum() + pen).backward()             # alpha = 0: only the penalty reaches the scorer
    assert wcb.alpha.grad.abs() > 0 and wcb.score.weight.grad.abs().sum() > 0
    wcb.zero_grad()
    with torch.no_grad():
        wcb.alpha.fill_(0.5)
    f, _, _ = wcb(x, None, g)
    f.square().sum().backward()                     # alpha != 0: the feature itself trains the scorer
    assert wcb.score.weight.grad.abs().sum() > 0


def test_wcb_autocast_bf16():
    torch.manual_seed(0)
    wcb = WCB(16)
    x, g = torch.randn(2, 5, 16), torch.randn(2, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, pen, att = wcb(x, mask, g)
    assert att.dtype == torch.float32 and pen.dtype == torch.float32 and torch.equal(f.float(), g)
    assert (att[~mask] == 0).all()
    with pytest.raises(ValueError, match="wcb.py"):
        WCB(16, n_maps=1)
