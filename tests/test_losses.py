"""Losses against independent definitions: open_clip's ClipLoss, per-anchor Python loops, FastCLIP's procedure."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clip_glofnd.losses import ClipInfoNCE, FastCLIPLoss, SogCLRLoss, create_loss, gamma_schedule

F64 = dict(atol=1e-10, rtol=1e-8)
EPS = 1e-14


def unit_leaf(n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[n, d] L2-normalised features, a leaf that requires grad."""
    return F.normalize(torch.randn(n, d, dtype=dtype), dim=1).requires_grad_()


def random_keep(b: int, B: int, p: float | None) -> torch.Tensor | None:
    """[b, B] bool, each entry True with probability p (None: no mask)."""
    return None if p is None else torch.rand(b, B) < p


def grads(loss: torch.Tensor, *leaves: torch.Tensor, allow_unused: bool = False) -> list[torch.Tensor]:
    """d loss / d leaves (zeros for leaves the loss does not use, when allow_unused)."""
    out = torch.autograd.grad(loss, leaves, allow_unused=allow_unused)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(out, leaves)]


# ---------------------------------------------------------------------------------------------------- brute force
def clip_brute(img, txt, img_all, txt_all, scale, keep_i2t, keep_t2i, offset):
    """Per-anchor loop: ℓ_i = −log(e^{s_ii/τ} / (e^{s_ii/τ} + (N_i/K_i)·Σ_{j kept} e^{s_ij/τ})), both directions."""
    total = 0.0
    for anchors, cands, keep in ((img, txt_all, keep_i2t), (txt, img_all, keep_t2i)):
        per_anchor = []
        for i in range(len(anchors)):
            p = offset + i
            pos = torch.exp(scale * torch.dot(anchors[i], cands[p]))
            negatives = [j for j in range(len(cands)) if j != p]
            kept = [j for j in negatives if keep is None or bool(keep[i, j])]
            denominator = pos
            if kept:
                neg_sum = sum(torch.exp(scale * torch.dot(anchors[i], cands[j])) for j in kept)
                denominator = pos + len(negatives) / len(kept) * neg_sum
            per_anchor.append(-torch.log(pos / denominator))
        total = total + torch.stack(per_anchor).mean()
    return total / 2


def gcl_brute(img, txt, img_all, txt_all, ids, keeps, offset, u_img, u_txt, gamma, tau, rho=0.0, g_factor=1.0):
    """Per-anchor loop for SogCLR / FastCLIP. u_img, u_txt: dicts id -> float (updated in place).

    Returns (value, feature surrogate, τ surrogate). `tau` is a float or a tensor (learnable τ); the feature
    surrogate's gradient is mean_i ½Σ_d τ∇g/(ε+u), the τ surrogate's is mean_i ½Σ_d [g_factor·τ ∂_τ g/(ε+u) +
    log(ε+u)] + ρ.
    """
    tau_const = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
    value, feat, tau_sur = 0.0, 0.0, 0.0
    for anchors, cands, keep, u in ((img, txt_all, keeps[0], u_img), (txt, img_all, keeps[1], u_txt)):
        rows = []                                                   # (kept list, g(features, τ const), g(detached, τ))
        for i in range(len(anchors)):
            p = offset + i
            kept = [j for j in range(len(cands)) if j != p and (keep is None or bool(keep[i, j]))]
            if not kept:
                rows.append(None)
                continue
            s_ii = torch.dot(anchors[i], cands[p])
            g_feat = sum(torch.exp((torch.dot(anchors[i], cands[j]) - s_ii) / tau_const) for j in kept) / len(kept)
            s_ii_d = s_ii.detach()
            g_tau = sum(torch.exp((torch.dot(anchors[i], cands[j]).detach() - s_ii_d) / tau) for j in kept) / len(kept)
            rows.append((g_feat, g_tau))
        for k in {int(x) for x in ids}:                             # one moving-average step per distinct id
            gs = [r[0].item() for r, x in zip(rows, ids) if int(x) == k and r is not None]
            if gs:
                g_mean = sum(gs) / len(gs)
                u[k] = g_mean if not (u.get(k, 0.0) > 1e-35) else (1 - gamma) * u[k] + gamma * g_mean
        per_value, per_feat, per_tau = [], [], []
        for r, x in zip(rows, ids):
            if r is None:
                per_value.append(0.0), per_feat.append(0.0), per_tau.append(0.0)
                continue
            log_u = math.log(EPS + u[int(x)])
            per_value.append(tau_const * log_u)
            per_feat.append(tau_const * r[0] / (EPS + u[int(x)]))
            per_tau.append(g_factor * tau_const * r[1] / (EPS + u[int(x)]) + tau * log_u)
        n = len(anchors)
        value = value + sum(per_value) / n / 2
        feat = feat + sum(per_feat) / n / 2
        tau_sur = tau_sur + sum(per_tau) / n / 2
    return value + rho * tau_const, feat, tau_sur + rho * tau


def fastclip_reference(img, txt, log_inv_tau, u_img, u_txt, gamma, rho, multiply_tau):
    """FastCLIP's single-process procedure (fast_clip/loss.py FastCLIPLoss.local + forward, re-derived, W = 1).

    Candidates are no-grad copies (its all_gather carries no gradient); loss1 = local anchors vs copies, loss2 =
    copies as anchors vs local features; loss = (mean(g1/u) + mean(g2/u))/2 summed over directions, then with
    multiply_tau: /logit_scale.detach() + ρ/logit_scale + mean(log u_im + log u_tt)/2/logit_scale.
    """
    scale = log_inv_tau.exp()                                       # logit_scale = 1/τ
    B = len(img)
    off_diag = 1.0 - torch.eye(B, dtype=img.dtype)

    def pair(a_img, a_txt, c_img, c_txt):
        diag = (a_img * a_txt).sum(1, keepdim=True)
        g_im = (torch.exp((a_img @ c_txt.T - diag) * scale) * off_diag).sum(1) / (B - 1)
        g_tt = (torch.exp((a_txt @ c_img.T - diag) * scale) * off_diag).sum(1) / (B - 1)
        return g_im, g_tt

    remote_img, remote_txt = img.detach(), txt.detach()
    g1_im, g1_tt = pair(img, txt, remote_img, remote_txt)
    u_im = torch.where(u_img > 1e-35, (1 - gamma) * u_img + gamma * g1_im.detach(), g1_im.detach())
    u_tt = torch.where(u_txt > 1e-35, (1 - gamma) * u_txt + gamma * g1_tt.detach(), g1_tt.detach())
    g2_im, g2_tt = pair(remote_img, remote_txt, img, txt)
    loss = ((g1_im / (u_im + EPS) + g1_tt / (u_tt + EPS)).mean()
            + (g2_im / (u_im + EPS) + g2_tt / (u_tt + EPS)).mean()) / 2
    if multiply_tau:
        loss = loss / scale.detach() + rho / scale + ((u_im + EPS).log() + (u_tt + EPS).log()).mean() / 2 / scale
    return loss, u_im, u_tt


def call(loss_fn, img, txt, img_all, txt_all, ids, offset=0, keeps=(None, None), epoch=0, logit_scale=None):
    ids_all = torch.arange(len(img_all))
    return loss_fn(img, txt, img_all, txt_all, ids=ids, ids_all=ids_all, epoch=epoch, keep_i2t=keeps[0],
                   keep_t2i=keeps[1], offset=offset, logit_scale=logit_scale)


# ---------------------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, dict(atol=1e-5, rtol=1e-5))])
@pytest.mark.parametrize("keep", ["none", "all_true"])
def test_clip_equals_open_clip(dtype, tol, keep):
    b = 8
    img, txt = unit_leaf(b, 16, dtype), unit_leaf(b, 16, dtype)
    scale = torch.tensor(1 / 0.07, dtype=dtype, requires_grad=True)
    masks = (None, None) if keep == "none" else (torch.ones(b, b, dtype=torch.bool),) * 2
    ours, metrics = call(ClipInfoNCE(), img, txt, img, txt, torch.arange(b), keeps=masks, logit_scale=scale)
    theirs = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, theirs, **tol)
    for g_ours, g_theirs in zip(grads(ours, img, txt, scale), grads(theirs, img, txt, scale)):
        torch.testing.assert_close(g_ours, g_theirs, **tol)
    assert metrics["temperature"] == pytest.approx(0.07)


@pytest.mark.parametrize("p_keep", [None, 1.0, 0.7, 0.3, 0.0])
@pytest.mark.parametrize("offset", [0, 3])
def test_clip_masked_matches_brute_force(p_keep, offset):
    b, B = 4, 9
    X, T = unit_leaf(B, 5), unit_leaf(B, 5)
    scale = torch.tensor(1 / 0.1, dtype=torch.float64, requires_grad=True)
    keeps = (random_keep(b, B, p_keep), random_keep(b, B, p_keep))
    img, txt = X[offset:offset + b], T[offset:offset + b]
    ours, _ = call(ClipInfoNCE(), img, txt, X, T, torch.arange(b), offset, keeps, logit_scale=scale)
    brute = clip_brute(img, txt, X, T, scale, *keeps, offset)
    torch.testing.assert_close(ours, brute, **F64)
    for g_ours, g_brute in zip(grads(ours, X, T, scale), grads(brute, X, T, scale)):
        torch.testing.assert_close(g_ours, g_brute, **F64)


def test_clip_masked_gradcheck():
    b, B, offset = 3, 6, 2
    keeps = (random_keep(b, B, 0.5), random_keep(b, B, 0.5))
    loss_fn = ClipInfoNCE()

    def fn(X, T, scale):
        img, txt = X[offset:offset + b], T[offset:offset + b]
        return call(loss_fn, img, txt, X, T, torch.arange(b), offset, keeps, logit_scale=scale)[0]

    inputs = (unit_leaf(B, 4), unit_leaf(B, 4), torch.tensor(5.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fn, inputs)


def test_clip_positive_never_removed():
    b = 5
    img, txt = unit_leaf(b, 8), unit_leaf(b, 8)
    scale = torch.tensor(10.0, dtype=torch.float64)
    all_true = torch.ones(b, b, dtype=torch.bool)
    diag_false = ~torch.eye(b, dtype=torch.bool)
    loss_fn = ClipInfoNCE()
    full, _ = call(loss_fn, img, txt, img, txt, torch.arange(b), keeps=(all_true, all_true), logit_scale=scale)
    same, _ = call(loss_fn, img, txt, img, txt, torch.arange(b), keeps=(diag_false, diag_false), logit_scale=scale)
    none_kept = torch.zeros(b, b, dtype=torch.bool)
    only_pos, metrics = call(loss_fn, img, txt, img, txt, torch.arange(b), keeps=(none_kept, none_kept),
                             logit_scale=scale)
    torch.testing.assert_close(full, same, **F64)
    assert only_pos.item() == 0.0                                   # −log(e^{s_ii}/e^{s_ii})
    assert metrics["kept_frac_i2t"] == 0.0


# ---------------------------------------------------------------------------------------------------- SogCLR / FastCLIP
def make_global(kind: str, n: int, **kwargs):
    if kind == "sogclr":
        return SogCLRLoss(n, tau=0.1, gamma_min=0.3, gamma_decay_epochs=4, **kwargs).double()
    return FastCLIPLoss(n, tau_init=0.1, rho=0.5, gamma_min=0.3, gamma_decay_epochs=4, **kwargs).double()


def prime_u(loss_fn, n: int) -> tuple[dict, dict]:
    """Give u random positive rows (some left unset = 0) and return them as dicts for the brute force."""
    with torch.no_grad():
        for u in (loss_fn.u_img, loss_fn.u_txt):
            u.copy_(torch.rand(n) * 2 + 0.1)
            u[::3] = 0.0
    return ({k: float(v) for k, v in enumerate(loss_fn.u_img)}, {k: float(v) for k, v in enumerate(loss_fn.u_txt)})


@pytest.mark.parametrize("kind,tau_grad", [("sogclr", None), ("fastclip", "fastclip"), ("fastclip", "objective")])
@pytest.mark.parametrize("p_keep", [None, 0.6, 0.0])
@pytest.mark.parametrize("epoch", [0, 2, 9])
def test_global_loss_matches_brute_force(kind, tau_grad, p_keep, epoch):
    n, b, B, offset = 20, 4, 8, 4
    X, T = unit_leaf(B, 5), unit_leaf(B, 5)
    ids_all = torch.randperm(n)[:B]
    ids = ids_all[offset:offset + b]
    keeps = (random_keep(b, B, p_keep), random_keep(b, B, p_keep))
    loss_fn = make_global(kind, n, **({} if tau_grad is None else {"tau_grad": tau_grad}))
    u_img, u_txt = prime_u(loss_fn, n)
    img, txt = X[offset:offset + b], T[offset:offset + b]
    ours, metrics = call(loss_fn, img, txt, X, T, ids, offset, keeps, epoch)

    gamma = gamma_schedule(epoch, 0.3, 4)
    tau = torch.tensor(0.1, dtype=torch.float64) if kind == "sogclr" else None
    theta = None
    if kind == "fastclip":
        theta = loss_fn.log_inv_tau.detach().clone().requires_grad_()
        tau = torch.exp(-theta)
    rho = 0.5 if kind == "fastclip" else 0.0
    g_factor = 2.0 if tau_grad == "fastclip" else 1.0
    value, feat, tau_sur = gcl_brute(img, txt, X, T, ids, keeps, offset, u_img, u_txt, gamma, tau, rho, g_factor)

    torch.testing.assert_close(ours.detach(), torch.as_tensor(float(value), dtype=torch.float64), **F64)
    params = [X, T] + ([loss_fn.log_inv_tau] if kind == "fastclip" else [])
    g_ours = grads(ours, *params)
    if p_keep == 0.0:                                               # nothing kept: no gradient to the features
        assert all(torch.count_nonzero(g) == 0 for g in g_ours[:2])
    else:
        for g_o, g_b in zip(g_ours[:2], grads(feat, X, T)):
            torch.testing.assert_close(g_o, g_b, **F64)
    if kind == "fastclip":
        torch.testing.assert_close(g_ours[2].double(), grads(tau_sur, theta)[0], atol=1e-7, rtol=1e-6)
    for key, u in (("u_img", u_img), ("u_txt", u_txt)):
        expected = torch.tensor([u.get(k, 0.0) for k in range(n)], dtype=torch.float32)
        torch.testing.assert_close(getattr(loss_fn, key).float(), expected, atol=0, rtol=1e-6)
    assert metrics["gamma"] == pytest.approx(gamma)
    assert metrics["temperature"] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["sogclr", "fastclip"])
@pytest.mark.parametrize("epoch", [0, 3])
def test_matches_fastclip_reference_procedure(kind, epoch):
    """Gradients equal FastCLIP's own (v1: up to our factor τ; v3 with tau_grad="fastclip": exactly, τ included)."""
    n, B = 12, 6
    X, T = unit_leaf(B, 5), unit_leaf(B, 5)
    ids = torch.arange(B) * 2
    loss_fn = make_global(kind, n)
    prime_u(loss_fn, n)
    u_img0, u_txt0 = loss_fn.u_img[ids].double(), loss_fn.u_txt[ids].double()
    ours, _ = call(loss_fn, X, T, X, T, ids, epoch=epoch)
    theta = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    ref, u_im, u_tt = fastclip_reference(X, T, theta, u_img0, u_txt0, gamma_schedule(epoch, 0.3, 4), 0.5,
                                         multiply_tau=kind == "fastclip")
    torch.testing.assert_close(loss_fn.u_img[ids].double(), u_im, atol=0, rtol=1e-6)
    torch.testing.assert_close(loss_fn.u_txt[ids].double(), u_tt, atol=0, rtol=1e-6)
    if kind == "sogclr":
        g_ours, g_ref = grads(ours, X, T), grads(ref, X, T)
        g_ref = [0.1 * g for g in g_ref]                           # ours is τ·∇g/(ε+u), FastCLIP-v1's ∇g/(ε+u)
    else:
        g_ours = [g.double() for g in grads(ours, X, T, loss_fn.log_inv_tau)]
        g_ref = grads(ref, X, T, theta)
    for g_o, g_r in zip(g_ours, g_ref):
        torch.testing.assert_close(g_o, g_r, atol=1e-7, rtol=1e-6)


def test_u_moving_average_over_steps_and_unset_rows():
    n, b = 10, 4
    loss_fn = SogCLRLoss(n, tau=0.2, gamma_min=0.25, gamma_decay_epochs=2)
    ids = torch.tensor([1, 4, 7, 8])
    g_first = None
    for epoch in (0, 5):                                            # γ = 1, then γ_min
        img, txt = unit_leaf(b, 6), unit_leaf(b, 6)
        sim = (img @ txt.T).detach()
        g = ((sim - sim.diag()[:, None]) / 0.2).exp().masked_fill(torch.eye(b, dtype=torch.bool), 0).sum(1) / (b - 1)
        call(loss_fn, img, txt, img, txt, ids, epoch=epoch)
        expected = g if g_first is None else 0.75 * g_first + 0.25 * g
        torch.testing.assert_close(loss_fn.u_img[ids], expected.float(), atol=0, rtol=1e-6)
        g_first = expected
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[ids] = False
    assert torch.all(loss_fn.u_img[untouched] == 0) and torch.all(loss_fn.u_txt[untouched] == 0)


def test_duplicate_ids_take_one_step_with_mean_g():
    n, b = 10, 3
    loss_fn = SogCLRLoss(n, tau=0.2, gamma_min=0.5, gamma_decay_epochs=0)   # constant γ = 0.5
    with torch.no_grad():
        loss_fn.u_img[3] = 2.0
    ids = torch.tensor([3, 5, 3])
    img, txt = unit_leaf(b, 6), unit_leaf(b, 6)
    sim = (img @ txt.T).detach()
    g = ((sim - sim.diag()[:, None]) / 0.2).exp().masked_fill(torch.eye(b, dtype=torch.bool), 0).sum(1) / (b - 1)
    loss, metrics = call(loss_fn, img, txt, img, txt, ids)
    expected_u3 = 0.5 * 2.0 + 0.5 * (g[0] + g[2]) / 2
    assert loss_fn.u_img[3].item() == pytest.approx(expected_u3.item(), rel=1e-6)
    assert loss_fn.u_img[5].item() == pytest.approx(g[1].item(), rel=1e-6)   # unset → g
    assert metrics["u_img_mean"] == pytest.approx(((2 * expected_u3 + g[1]) / 3).item(), rel=1e-6)


def test_rows_without_negatives_leave_u_unchanged():
    n, b = 6, 3
    loss_fn = FastCLIPLoss(n, tau_init=0.1).double()
    with torch.no_grad():
        loss_fn.u_img.fill_(0.5)
    keep = torch.ones(b, b, dtype=torch.bool)
    keep[1] = False                                                 # anchor 1 keeps no negative
    img, txt = unit_leaf(b, 4), unit_leaf(b, 4)
    call(loss_fn, img, txt, img, txt, torch.tensor([0, 1, 2]), keeps=(keep, None), epoch=0)
    assert loss_fn.u_img[1].item() == 0.5
    assert loss_fn.u_img[0].item() != 0.5 and loss_fn.u_img[2].item() != 0.5


# ---------------------------------------------------------------------------------------------------- distributed form
@pytest.mark.parametrize("kind", ["clip", "sogclr", "fastclip"])
@pytest.mark.parametrize("p_keep", [None, 0.6])
def test_two_halves_with_offset_equal_full_batch(kind, p_keep):
    """World size 2 simulated: each half's local anchors vs the full gathered batch, averaged = full-batch loss."""
    n, B = 16, 8
    b = B // 2
    X, T = unit_leaf(B, 5), unit_leaf(B, 5)
    ids_all = torch.randperm(n)[:B]
    keeps = (random_keep(B, B, p_keep), random_keep(B, B, p_keep))
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    full_fn = create_loss(kind, n).double()
    if kind != "clip":
        prime_u(full_fn, n)
    ranks = [copy.deepcopy(full_fn) for _ in range(2)]
    full, _ = call(full_fn, X, T, X, T, ids_all, 0, keeps, epoch=1, logit_scale=scale)
    halves = []
    for r, loss_fn in enumerate(ranks):
        rows = slice(r * b, (r + 1) * b)
        rank_keeps = tuple(None if k is None else k[rows] for k in keeps)
        halves.append(call(loss_fn, X[rows], T[rows], X, T, ids_all[rows], r * b, rank_keeps, 1, scale)[0])
    averaged = (halves[0] + halves[1]) / 2
    torch.testing.assert_close(averaged, full, **F64)
    leaves = [X, T, scale] + list(full_fn.parameters())
    g_full = grads(full, *leaves, allow_unused=True)
    g_ranks = [grads(h, *([X, T, scale] + list(fn.parameters())), allow_unused=True) for h, fn in zip(halves, ranks)]
    for i, g in enumerate(g_full):                                  # DDP averages the ranks' gradients
        torch.testing.assert_close((g_ranks[0][i] + g_ranks[1][i]) / 2, g, **F64)
    if kind != "clip":                                              # sync: each rank imports the other's rows
        for r, loss_fn in enumerate(ranks):
            other = ranks[1 - r]
            other_ids = ids_all[(1 - r) * b:(2 - r) * b]
            loss_fn.import_rows(other_ids, other.export_rows(other_ids))
            for key in ("u_img", "u_txt"):
                torch.testing.assert_close(getattr(loss_fn, key), getattr(full_fn, key), atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- state, schedule
@pytest.mark.parametrize("kind", ["sogclr", "fastclip"])
def test_state_dict_round_trip_and_rows(kind):
    n, b = 12, 4
    loss_fn = create_loss(kind, n)
    img, txt = unit_leaf(b, 6, torch.float32), unit_leaf(b, 6, torch.float32)
    call(loss_fn, img, txt, img, txt, torch.tensor([0, 3, 5, 9]), epoch=0)[0].backward()
    if kind == "fastclip":
        with torch.no_grad():
            loss_fn.log_inv_tau.add_(0.3)
    restored = create_loss(kind, n)
    restored.load_state_dict(copy.deepcopy(loss_fn.state_dict()))
    assert set(loss_fn.state_dict()) == ({"u_img", "u_txt"} | ({"log_inv_tau"} if kind == "fastclip" else set()))
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    img2, txt2 = unit_leaf(b, 6, torch.float32), unit_leaf(b, 6, torch.float32)
    a, _ = call(loss_fn, img2, txt2, img2, txt2, torch.tensor([0, 3, 6, 7]), epoch=3)
    c, _ = call(restored, img2, txt2, img2, txt2, torch.tensor([0, 3, 6, 7]), epoch=3)
    assert torch.equal(a, c) and torch.equal(loss_fn.u_img, restored.u_img)

    ids = torch.tensor([3, 0, 3])
    rows = loss_fn.export_rows(ids)
    assert set(rows) == {"u_img", "u_txt"} and rows["u_img"].shape == (3,)
    fresh = create_loss(kind, n)
    fresh.import_rows(ids, {"u_img": torch.tensor([1.0, 2.0, 3.0]), "u_txt": torch.tensor([4.0, 5.0, 6.0])})
    assert fresh.u_img[3].item() == 1.0 and fresh.u_img[0].item() == 2.0    # first occurrence wins
    assert fresh.u_txt[3].item() == 4.0 and int(torch.count_nonzero(fresh.u_img)) == 2
    with pytest.raises(ValueError, match="u_txt"):
        fresh.import_rows(ids, {"u_img": torch.zeros(3)})


@pytest.mark.parametrize("epoch,decay,expected", [
    (0, 10, 1.0), (5, 10, 0.6), (10, 10, 0.2), (25, 10, 0.2),
    (2, 8, 0.5 * (1 + math.cos(math.pi / 4)) * 0.8 + 0.2), (0, 0, 0.2), (7, 0, 0.2),
])
def test_gamma_schedule(epoch, decay, expected):
    assert gamma_schedule(epoch, 0.2, decay) == pytest.approx(expected)


def test_fastclip_tau_parameter_and_clamp():
    loss_fn = FastCLIPLoss(4, tau_init=0.07)
    assert [name for name, _ in loss_fn.named_parameters()] == ["log_inv_tau"]
    assert loss_fn.temperature == pytest.approx(0.07)
    with torch.no_grad():
        loss_fn.log_inv_tau.fill_(math.log(1 / 0.001))
    loss_fn.clamp_tau_()
    assert loss_fn.temperature == pytest.approx(0.01)
    with torch.no_grad():
        loss_fn.log_inv_tau.fill_(-1.0)
    loss_fn.clamp_tau_()
    assert loss_fn.temperature == pytest.approx(1.0)
    assert list(SogCLRLoss(4).parameters()) == [] and list(ClipInfoNCE().parameters()) == []


def test_create_loss_names_and_options():
    assert isinstance(create_loss("clip", 5, tau=0.03, rho=6.5), ClipInfoNCE)   # shared config: extras ignored
    assert isinstance(create_loss("fastclip-v1", 5, tau=0.05), SogCLRLoss)
    v3 = create_loss("fastclip", 5, tau_init=0.05, rho=3.0, gamma_min=0.5, tau=0.03)
    assert isinstance(v3, FastCLIPLoss) and v3.rho == 3.0 and v3.u_img.shape == (5,)
    with pytest.raises(ValueError, match="unknown loss 'simclr'"):
        create_loss("simclr", 5)
    with pytest.raises(ValueError, match="temprature"):
        create_loss("sogclr", 5, temprature=0.1)


def test_bad_shapes_raise():
    img = unit_leaf(3, 4)
    with pytest.raises(ValueError, match="keep_i2t"):
        ClipInfoNCE()(img, img, img, img, ids=None, ids_all=None, epoch=0, keep_i2t=torch.ones(3, 2, dtype=torch.bool),
                      logit_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="offset"):
        SogCLRLoss(5)(img, img, img, img, ids=torch.arange(3), ids_all=None, epoch=0, offset=1)
    with pytest.raises(ValueError, match="logit_scale"):
        ClipInfoNCE()(img, img, img, img, ids=None, ids_all=None, epoch=0)


@pytest.mark.parametrize("kind", ["clip", "sogclr", "fastclip"])
def test_low_precision_features_use_float32_similarities(kind):
    """bf16 features under autocast give the float32 loss of the same (rounded) features."""
    b = 6
    img, txt = (F.normalize(torch.randn(b, 8), dim=1).bfloat16() for _ in range(2))
    scale = torch.tensor(1 / 0.07)
    results = []
    for x, y in ((img, txt), (img.float(), txt.float())):
        loss_fn = create_loss(kind, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = call(loss_fn, x, y, x, y, torch.arange(b), logit_scale=scale)
        results.append(loss)
    assert results[0].dtype == torch.float32 and torch.isfinite(results[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)
