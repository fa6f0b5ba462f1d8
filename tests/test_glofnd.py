"""GloFND thresholds against independent definitions: exact quantiles, torch.optim.Adam, brute-force loops."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_glofnd.glofnd import GloFND, minibatch_quantile, quantile_grad

BETAS = (0.9, 0.98)


def _clustered_pairs(n: int = 256, dim: int = 8, clusters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen unit image/text embeddings with cluster structure, so every anchor has true false negatives."""
    labels = torch.randint(clusters, (n,))
    centers = F.normalize(torch.randn(clusters, dim), dim=1)
    img = F.normalize(centers[labels] + 0.4 * torch.randn(n, dim), dim=1)    # [n, d]
    txt = F.normalize(img + 0.2 * torch.randn(n, dim), dim=1)                 # [n, d] paired captions
    return img, txt


def _trained(num_samples: int = 12, steps: int = 5, **kwargs) -> GloFND:
    fnd = GloFND(num_samples, 0.2, **kwargs)
    for _ in range(steps):
        ids = torch.randperm(num_samples)[:4]
        fnd.update(torch.rand(4, 6) * 2 - 1, ids, epoch=0)
    return fnd


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_lambda_tracks_global_quantile_better_than_minibatch_fnd(direction: str) -> None:
    n, batch, alpha, passes = 256, 32, 0.05, 150
    img, txt = _clustered_pairs(n)
    sim_all = img @ txt.T if direction == "i2t" else txt @ img.T                # [n, n] anchors × candidates
    neg_all = ~torch.eye(n, dtype=torch.bool)                                   # [n, n] every other pair is negative

    def frac_above(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:   # over ALL negatives of each row
        return ((sim_all[rows] > thresholds[:, None]) & neg_all[rows]).sum(1) / (n - 1)

    fnd = GloFND(n, alpha)
    fnd_errors = []
    for epoch in range(passes):
        for ids in torch.randperm(n).split(batch):
            sim, neg = sim_all[ids][:, ids], ~torch.eye(len(ids), dtype=torch.bool)     # [B, B]
            fnd.update(sim, ids, epoch, neg)
            if epoch >= passes - 10:                                             # the local baseline, same batches
                fnd_errors.append((frac_above(ids, minibatch_quantile(sim, neg, alpha)) - alpha).abs())
    glofnd_error = (frac_above(torch.arange(n), fnd.threshold) - alpha).abs()   # [n]
    fnd_error = torch.cat(fnd_errors)
    assert (glofnd_error < 0.03).float().mean() > 0.8                           # most anchors: α ± 0.03
    assert glofnd_error.mean() < 0.5 * fnd_error.mean()                         # global beats mini-batch quantile


@pytest.mark.parametrize("alpha", [0.1, 0.02])
def test_lambda_converges_to_exact_quantile(alpha: float) -> None:
    sims = torch.rand(4, 2000, dtype=torch.float64) * 2 - 1                    # 4 anchors, fixed negatives
    target = torch.quantile(sims.float(), 1 - alpha, dim=1)                     # oracle: exact (1 − α) quantile
    fnd = GloFND(4, alpha, lr=0.005)
    for _ in range(2000):
        fnd.update(sims[:, torch.randint(2000, (128,))], torch.arange(4), epoch=0)
    torch.testing.assert_close(fnd.threshold, target, atol=0.03, rtol=0)


def test_adam_step_equals_torch_optim_adam_and_other_rows_untouched() -> None:
    alpha, lr, row = 0.3, 0.05, 2
    fnd = GloFND(5, alpha, lr=lr, betas=BETAS, eps=1e-8)
    param = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.Adam([param], lr=lr, betas=BETAS, eps=1e-8)
    for _ in range(25):
        sim = torch.rand(1, 16) * 2 - 1
        param.grad = torch.tensor([alpha - (sim > param.detach()).float().mean().item()])   # g = α − mean 1[s > λ]
        opt.step()
        with torch.no_grad():
            param.clamp_(-1, 1)
        fnd.update(sim, torch.tensor([row]), epoch=0)
        torch.testing.assert_close(fnd.threshold[row:row + 1], param.detach())
    state = opt.state[param]
    torch.testing.assert_close(fnd.m[row:row + 1], state["exp_avg"])
    torch.testing.assert_close(fnd.v[row:row + 1], state["exp_avg_sq"])
    assert fnd.steps[row] == 25
    others = torch.tensor([0, 1, 3, 4])
    assert (fnd.lam[others] == 1).all() and (fnd.m[others] == 0).all() and (fnd.v[others] == 0).all()
    assert (fnd.steps[others] == 0).all()


def test_epoch_bias_correction_matches_hand_loop() -> None:
    alpha, lr, start = 0.2, 0.05, 2
    fnd = GloFND(3, alpha, lr=lr, start_epoch=start, bias_correction="epoch")
    lam, m, v = 1.0, 0.0, 0.0
    for epoch in [2, 2, 3, 5, 5]:
        sim = torch.rand(1, 10, dtype=torch.float64) * 2 - 1
        g = alpha - (sim.float() > lam).double().mean().item()
        m, v, t = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g, epoch + 1  # absolute
        lam = min(1.0, max(-1.0, lam - lr * (m / (1 - BETAS[0] ** t)) / (math.sqrt(v / (1 - BETAS[1] ** t)) + 1e-8)))
        fnd.update(sim, torch.tensor([1]), epoch)
        assert fnd.threshold[1].item() == pytest.approx(lam, abs=1e-6)


def test_quantile_init_first_visit_is_exact_row_quantile_then_adam() -> None:
    alpha, lr = 0.2, 0.05
    fnd = GloFND(6, alpha, lr=lr, init="quantile")
    sim = torch.rand(3, 11) * 2 - 1
    neg = torch.rand(3, 11) < 0.7
    neg[:, 0] = True
    ids = torch.tensor([4, 1, 4])                                               # id 4 twice: mean of its two rows
    fnd.update(sim, ids, epoch=0, neg_mask=neg)
    q = [torch.quantile(sim[i][neg[i]], 1 - alpha) for i in range(3)]          # oracle: exact quantile per row
    torch.testing.assert_close(fnd.threshold[[4, 1]], torch.stack([(q[0] + q[2]) / 2, q[1]]))
    assert fnd.m.abs().sum() == 0 and fnd.v.abs().sum() == 0                    # the first visit takes no Adam step
    assert fnd.steps.tolist() == [0, 1, 0, 0, 1, 0]
    param = torch.nn.Parameter(fnd.threshold[1:2].clone())                      # then Adam from there, as torch's
    opt = torch.optim.Adam([param], lr=lr, betas=BETAS, eps=1e-8)
    for _ in range(5):
        row = torch.rand(1, 11) * 2 - 1
        param.grad = torch.tensor([alpha - (row > param.detach()).float().mean().item()])
        opt.step()
        fnd.update(row, torch.tensor([1]), epoch=0)
        torch.testing.assert_close(fnd.threshold[1:2], param.detach())
    assert fnd.steps[1] == 6


def test_quantile_init_only_on_first_visit_and_one_init_unchanged() -> None:
    sim = torch.tensor([[0.9, 0.5, 0.1, -0.2, -0.4]])
    warm, cold = GloFND(2, 0.25, init="quantile"), GloFND(2, 0.25)
    warm.update(sim, torch.tensor([0]), epoch=0)
    assert warm.threshold[0].item() == pytest.approx(torch.quantile(sim[0], 0.75).item())
    assert warm.threshold[1] == 1                                               # rows not in the batch untouched
    cold.update(sim, torch.tensor([0]), epoch=0)
    assert cold.threshold[0].item() == pytest.approx(0.95)                      # paper's start: λ = 1, one step
    warm.update(sim, torch.tensor([0]), epoch=0)                                # second visit: Adam's first step
    assert warm.threshold[0].item() == pytest.approx(0.5 - 0.05)                # g = 0.25 − 1/5 > 0: λ − lr·sign(g)
    assert warm.steps[0] == 2 and warm.m[0].item() == pytest.approx(0.1 * 0.05)


def test_lambda_clamped_and_positives_never_masked_at_minus_one() -> None:
    fnd = GloFND(4, 0.1, lr=10.0)
    sim = torch.tensor([[0.5, -1.0, 0.0], [-0.3, 0.2, -1.0]])
    neg = torch.tensor([[False, True, True], [True, False, True]])
    fnd.update(sim - 3.0, torch.tensor([0, 3]), epoch=0)                         # nothing above: g = α, huge step
    assert fnd.threshold.tolist() == [-1.0, 1.0, 1.0, -1.0]
    keep = fnd.keep_mask(sim, torch.tensor([0, 3]), epoch=0, neg_mask=neg)
    assert keep[~neg].all()                                                     # positives stay, even at λ = −1
    assert keep[neg].tolist() == [True, False, False, True]                    # only s = −1 ≤ λ = −1 stays
    fnd.update(sim[:1] + 3.0, torch.tensor([0]), epoch=0)                        # all above: g = α − 1, huge step
    assert fnd.threshold[0].item() == 1.0


def test_update_and_keep_mask_hand_computed() -> None:
    alpha, lr = 0.25, 0.1
    fnd = GloFND(8, alpha, lr=lr)
    sim = torch.tensor([[0.99, 0.95, 0.50, 0.20], [0.30, 0.97, 0.92, 0.10]])
    neg = ~torch.eye(2, 4, dtype=torch.bool)                                     # positives at (0, 0) and (1, 1)
    ids = torch.tensor([3, 7])
    stats = fnd.update(sim, ids, 0, neg)                                         # λ = 1: nothing above, g = α
    # first Adam step: m̂ = g, v̂ = g², so λ moves by lr · sign(g)
    assert stats == pytest.approx({"updated_rows": 2, "lam_mean": 0.9, "grad_mean": 0.25, "above_frac": 0.0})
    assert fnd.threshold[ids].tolist() == pytest.approx([0.9, 0.9])
    assert fnd.m[ids].tolist() == pytest.approx([0.025, 0.025])
    assert fnd.v[ids].tolist() == pytest.approx([0.00125, 0.00125])
    keep = fnd.keep_mask(sim, ids, 0, neg)
    assert keep.tolist() == [[True, False, True, True], [True, True, False, True]]
    stats = fnd.update(sim, ids, 0, neg)                                         # one of three negatives above 0.9
    g = alpha - 1 / 3
    m, v = 0.9 * 0.025 + 0.1 * g, 0.98 * 0.00125 + 0.02 * g * g
    lam = 0.9 - lr * (m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.98 ** 2)) + 1e-8)
    assert stats == pytest.approx({"updated_rows": 2, "lam_mean": lam, "grad_mean": g, "above_frac": 2 / 6})
    assert fnd.threshold[ids].tolist() == pytest.approx([lam, lam])
    assert fnd.steps[ids].tolist() == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("with_neg_mask", [True, False])
def test_keep_mask_and_grad_match_brute_force(dtype: torch.dtype, with_neg_mask: bool) -> None:
    fnd = GloFND(10, 0.3)
    lam = torch.rand(10) * 2 - 1
    fnd.import_rows(torch.arange(10), {**fnd.export_rows(torch.arange(10)), "lam": lam})
    sim = (torch.rand(6, 9, dtype=torch.float64) * 2 - 1).to(dtype)
    ids = torch.tensor([4, 1, 4, 9, 0, 1])                                       # duplicates use their one λ
    neg = torch.rand(6, 9) < 0.7 if with_neg_mask else None
    if with_neg_mask:
        neg[2] = False                                                          # a row without negatives
    keep = fnd.keep_mask(sim, ids, epoch=0, neg_mask=neg)
    grad = quantile_grad(sim.float(), lam[ids], neg, 0.3)
    for i in range(6):
        negatives = [j for j in range(9) if neg is None or neg[i, j]]
        above = [j for j in negatives if sim[i, j].float().item() > lam[ids[i]].item()]
        assert grad[i].item() == pytest.approx(0.3 - len(above) / len(negatives) if negatives else 0.0)
        for j in range(9):
            assert keep[i, j].item() == (j not in above), (i, j)


def test_duplicate_ids_take_one_step_with_mean_gradient() -> None:
    alpha, lr = 0.25, 0.05
    fnd = GloFND(6, alpha, lr=lr)
    sim = torch.tensor([[0.99, 0.97, 0.5, 0.2], [0.5, 0.4, 0.3, 0.2], [0.96, 0.0, -0.1, -0.2], [0.3, 0.2, 0.1, 0.0]])
    neg = torch.ones(4, 4, dtype=torch.bool)
    neg[3] = False                                                              # no negatives: no gradient, no step
    fnd.update(torch.full((1, 4), -0.5), torch.tensor([5]), 0)                   # λ_5 leaves 1 first (to 0.95)
    lam5 = fnd.threshold[5].item()
    param = torch.nn.Parameter(fnd.threshold[5:6].clone())
    opt = torch.optim.Adam([param], lr=lr, betas=BETAS)
    opt.state[param] = {"step": torch.tensor(1.0), "exp_avg": fnd.m[5:6].clone(), "exp_avg_sq": fnd.v[5:6].clone()}
    grads = [alpha - (sim[i] > lam5).float().mean().item() for i in (0, 2)]
    assert grads == pytest.approx([-0.25, 0.0])                                 # rows of id 5 disagree
    param.grad = torch.tensor([sum(grads) / 2])
    opt.step()
    stats = fnd.update(sim, torch.tensor([5, 1, 5, 0]), 0, neg)
    torch.testing.assert_close(fnd.threshold[5:6], param.detach())
    assert fnd.steps.tolist() == [0, 1, 0, 0, 0, 2]                             # one step per id; id 0 had no negatives
    assert fnd.threshold[0].item() == 1.0 and fnd.m[0].item() == 0.0
    assert stats["updated_rows"] == 2


def _neg_except(positive: torch.Tensor | None, b: int, m: int) -> torch.Tensor | None:
    """The trainer's negatives written out: every column but row i's positive (brute-force loop)."""
    if positive is None:
        return None
    return torch.tensor([[j != positive[i].item() for j in range(m)] for i in range(b)])


@pytest.mark.parametrize("mode", ["glofnd", "fnd", "oracle", "none"])
@pytest.mark.parametrize("init, bias_correction", [("one", "sample"), ("quantile", "sample"), ("one", "epoch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_positive", [True, False])
def test_update_and_mask_equals_update_then_keep_mask(mode: str, init: str, bias_correction: str,
                                                      dtype: torch.dtype, with_positive: bool) -> None:
    """Bit for bit: state after every step, the masks, and the λ rows returned; over the epoch gates (no learning,
    learning without masking, both), duplicate ids, rows revisited, positives anywhere in the row."""
    kwargs = dict(lr=0.3, start_epoch=1, mask_start_epoch=2, mode=mode, init=init, bias_correction=bias_correction)
    fused, reference = GloFND(9, 0.2, **kwargs), GloFND(9, 0.2, **kwargs)
    labels_all = torch.randint(3, (10,))
    for step, epoch in enumerate([0, 1, 1, 2, 2, 3]):
        ids = torch.randint(9, (6,))                                             # duplicates likely
        offset = step % 5                                                        # local rows at 0..4 of 10 columns
        sim = (torch.rand(6, 10, dtype=torch.float64) * 2 - 1).to(dtype)
        positive = torch.arange(6) % 10 if not with_positive else (torch.arange(6) + offset) % 10
        neg = _neg_except(positive if with_positive else None, 6, 10)
        labels = labels_all[positive]
        keep, lam = fused.update_and_mask(sim, ids, epoch, positive if with_positive else None, labels, labels_all)
        reference.update(sim, ids, epoch, neg)
        expected = reference.keep_mask(sim, ids, epoch, neg, labels, labels_all)
        assert torch.equal(keep, expected), (step, epoch)
        assert torch.equal(lam, reference.threshold[ids]), (step, epoch)
        for key, value in reference.state_dict().items():
            assert torch.equal(getattr(fused, key), value), (step, epoch, key)
    if mode == "glofnd":
        assert (fused.steps > 0).any() and not keep.all()                       # it learned and masked something


@pytest.mark.parametrize("bias_correction", ["sample", "epoch"])
def test_update_and_mask_learn_epoch_is_update_at_it_then_mask_at_epoch(bias_correction: str) -> None:
    """The state warm-up's call: λ learns as `update(..., learn_epoch)` (here before start_epoch, and with the
    epoch-based bias correction at learn_epoch + 1) while the mask follows `epoch`'s gate (nothing filtered yet)."""
    kwargs = dict(lr=0.3, start_epoch=3, mask_start_epoch=3, init="quantile", bias_correction=bias_correction)
    fused, reference = GloFND(9, 0.2, **kwargs), GloFND(9, 0.2, **kwargs)
    positive = torch.arange(6)
    neg = _neg_except(positive, 6, 10)
    for step in range(4):
        ids, sim = torch.randint(9, (6,)), torch.rand(6, 10) * 2 - 1
        keep, lam = fused.update_and_mask(sim, ids, 0, positive, learn_epoch=3)
        reference.update(sim, ids, 3, neg)
        assert keep.all() and torch.equal(lam, reference.threshold[ids]), step
        for key, value in reference.state_dict().items():
            assert torch.equal(getattr(fused, key), value), (step, key)
    assert (fused.steps > 0).any()


def test_update_and_mask_matches_brute_force_adam_and_mask() -> None:
    """One step from random λ, m, v, steps, against a hand loop: g_i over the columns other than the positive, one
    Adam step per distinct id with the mean g of its rows, then the mask from the new λ (positive always kept)."""
    alpha, lr, n = 0.3, 0.05, 10
    fnd = GloFND(n, alpha, lr=lr)
    start = {"lam": torch.rand(n) * 2 - 1, "m": torch.randn(n) * 0.1, "v": torch.rand(n) * 0.01,
             "steps": torch.randint(1, 5, (n,), dtype=torch.int32)}
    fnd.import_rows(torch.arange(n), start)
    sim, ids, positive = torch.rand(5, 7) * 2 - 1, torch.tensor([4, 1, 4, 9, 0]), torch.tensor([2, 3, 4, 5, 6])
    keep, lam_rows = fnd.update_and_mask(sim, ids, 0, positive)
    grads: dict[int, list[float]] = {}
    for i, k in enumerate(ids.tolist()):
        negatives = [j for j in range(7) if j != positive[i]]
        grads.setdefault(k, []).append(alpha - sum(sim[i, j].item() > start["lam"][k].item() for j in negatives) / 6)
    for k, gs in grads.items():
        g, t = sum(gs) / len(gs), start["steps"][k].item() + 1
        m = BETAS[0] * start["m"][k].item() + (1 - BETAS[0]) * g
        v = BETAS[1] * start["v"][k].item() + (1 - BETAS[1]) * g * g
        lam = start["lam"][k].item() - lr * (m / (1 - BETAS[0] ** t)) / (math.sqrt(v / (1 - BETAS[1] ** t)) + 1e-8)
        assert fnd.threshold[k].item() == pytest.approx(max(-1.0, min(1.0, lam)), abs=1e-6), k
        assert fnd.steps[k].item() == t
    for i in range(5):
        assert lam_rows[i] == fnd.threshold[ids[i]]
        for j in range(7):
            assert keep[i, j].item() == (j == positive[i] or sim[i, j].item() <= fnd.threshold[ids[i]].item()), (i, j)


@pytest.mark.parametrize("positive, match", [
    (torch.tensor([0, 1, 5, 2]), r"1 of 4 positive columns outside \[0, 5\)"),
    (torch.tensor([0, 1, 2]), r"positive must be an integer tensor of shape \[4\]"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"positive must be an integer tensor"),
])
def test_update_and_mask_bad_positive_raises(positive: torch.Tensor, match: str) -> None:
    fnd = GloFND(10, 0.1)
    with pytest.raises(ValueError, match=match):
        fnd.update_and_mask(torch.rand(4, 5), torch.tensor([0, 3, 5, 9]), 0, positive)
    assert (fnd.threshold == 1).all() and (fnd.steps == 0).all()


@pytest.mark.parametrize("method", ["update", "keep_mask"])
@pytest.mark.parametrize("case, match", [
    ("id_high", r"2 of 4 ids outside \[0, 10\) \(min 0, max 12\)"),
    ("id_negative", r"1 of 4 ids outside \[0, 10\) \(min -1"),
    ("ids_length", r"ids must be an integer tensor of shape \[4\]"),
    ("ids_float", r"ids must be an integer tensor"),
    ("neg_mask_shape", r"neg_mask must be a bool tensor shaped like sim \(4, 5\)"),
    ("neg_mask_dtype", r"neg_mask must be a bool tensor"),
    ("sim_1d", r"sim must be a 2-D float tensor"),
    ("sim_nan", r"sim has 3 of 20 entries not finite"),
    ("sim_inf", r"sim has 1 of 20 entries not finite"),
])
def test_bad_inputs_raise_informative_value_error(method: str, case: str, match: str) -> None:
    fnd = GloFND(10, 0.1)
    sim, ids, neg = torch.rand(4, 5), torch.tensor([0, 3, 5, 9]), torch.ones(4, 5, dtype=torch.bool)
    if case == "id_high":
        ids = torch.tensor([0, 10, 5, 12])
    elif case == "id_negative":
        ids = torch.tensor([0, -1, 5, 9])
    elif case == "ids_length":
        ids = ids[:3]
    elif case == "ids_float":
        ids = ids.float()
    elif case == "neg_mask_shape":
        neg = neg[:, :4]
    elif case == "neg_mask_dtype":
        neg = neg.float()
    elif case == "sim_1d":
        sim = sim[0]
    elif case == "sim_nan":
        sim[0, :3] = math.nan
    elif case == "sim_inf":
        sim[2, 1] = -math.inf
    with pytest.raises(ValueError, match=match):
        getattr(fnd, method)(sim, ids, 0, neg)
    assert (fnd.threshold == 1).all() and (fnd.steps == 0).all()               # nothing half-written


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.0}, "alpha must be in"),
    ({"alpha": 1.0}, "alpha must be in"),
    ({"mode": "bogus"}, "mode must be one of"),
    ({"bias_correction": "step"}, "bias_correction must be one of"),
    ({"start_epoch": 3, "mask_start_epoch": 2}, r"mask_start_epoch \(2\) must be >= start_epoch \(3\)"),
    ({"num_samples": 0}, "num_samples must be a positive int"),
])
def test_bad_constructor_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GloFND(**{"num_samples": 10, "alpha": 0.1, **kwargs})


@pytest.mark.parametrize("labels, candidate_labels, match", [
    (None, None, "mode 'oracle' needs labels"),
    (torch.zeros(3), torch.zeros(5), r"labels must have shape \[4\]"),
    (torch.zeros(4), torch.zeros(4), r"candidate_labels must have shape \[5\]"),
    (torch.zeros(4), None, "needs candidate_labels"),
])
def test_oracle_label_errors(labels, candidate_labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GloFND(10, 0.1, mode="oracle").keep_mask(torch.rand(4, 5), torch.arange(4), 0, None, labels, candidate_labels)


def test_state_dict_round_trip_and_size_check() -> None:
    fnd = _trained()
    other = GloFND(12, 0.2)
    other.load_state_dict({k: t.clone() for k, t in fnd.state_dict().items()})
    for key, value in fnd.state_dict().items():
        assert torch.equal(getattr(other, key), value), key
    sim, ids = torch.rand(3, 5), torch.tensor([1, 2, 1])
    assert fnd.update(sim, ids, 0) == other.update(sim, ids, 0)                 # resumed == uninterrupted
    assert torch.equal(fnd.threshold, other.threshold)
    with pytest.raises(ValueError, match=r"'lam' has shape \(12,\), expected \(13,\).*num_samples"):
        GloFND(13, 0.2).load_state_dict(fnd.state_dict())
    with pytest.raises(ValueError, match=r"missing keys \['steps'\]"):
        other.load_state_dict({k: t for k, t in fnd.state_dict().items() if k != "steps"})


def test_export_import_rows_round_trip() -> None:
    source, target = _trained(), GloFND(12, 0.2)
    ids = torch.tensor([7, 0, 11, 3])
    target.import_rows(ids, source.export_rows(ids))
    rest = torch.tensor([i for i in range(12) if i not in ids.tolist()])
    for key in ("lam", "m", "v", "steps"):
        assert torch.equal(getattr(target, key)[ids], getattr(source, key)[ids]), key
        assert torch.equal(getattr(target, key)[rest], GloFND(12, 0.2).state_dict()[key][rest]), key
    rows = {"lam": torch.tensor([0.1, 0.2, 0.3]), "m": torch.zeros(3), "v": torch.zeros(3), "steps": torch.ones(3)}
    target.import_rows(torch.tensor([5, 6, 5]), rows)                            # repeated id: first occurrence wins
    assert target.threshold[[5, 6]].tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match=r"rows\['m'\] must have shape \(3,\)"):
        target.import_rows(torch.tensor([1, 2, 4]), {**rows, "m": torch.zeros(2)})


def test_start_epoch_and_mask_start_epoch_gating() -> None:
    fnd = GloFND(4, 0.4, lr=0.5, start_epoch=2, mask_start_epoch=3)
    sim, ids = torch.tensor([[0.9, 0.1], [0.8, -0.5]]), torch.tensor([0, 1])
    assert fnd.update(sim, ids, epoch=1) == {"updated_rows": 0.0}               # before start_epoch: no learning
    assert (fnd.threshold == 1).all() and (fnd.steps == 0).all()
    for epoch in (2, 2, 2):
        fnd.update(sim, ids, epoch)
    assert (fnd.threshold[:2] < 0.8).all()                                      # learned enough to mask something
    assert fnd.keep_mask(sim, ids, epoch=2).all()                               # before mask_start_epoch: keep all
    assert not fnd.keep_mask(sim, ids, epoch=3).all()
    assert GloFND(4, 0.4, start_epoch=5).mask_start_epoch == 5                  # default: masking starts with learning


def test_fnd_mode_uses_per_row_minibatch_quantile() -> None:
    alpha = 0.3
    fnd = GloFND(10, alpha, mode="fnd")
    sim, neg = torch.rand(5, 12) * 2 - 1, torch.rand(5, 12) < 0.6
    neg[3] = False                                                              # no negatives: keeps all
    neg[4] = True
    ids = torch.arange(5)
    keep = fnd.keep_mask(sim, ids, 0, neg)
    for i in range(5):
        expected = torch.ones(12, dtype=torch.bool)
        if neg[i].any():
            q = torch.quantile(sim[i][neg[i]], 1 - alpha)                        # oracle: exact quantile of the row
            expected = ~neg[i] | (sim[i] <= q)
        assert torch.equal(keep[i], expected), i
    assert fnd.update(sim, ids, 0, neg) == {"updated_rows": 0.0}                # fnd learns nothing
    assert (fnd.threshold == 1).all()


def test_oracle_mode_drops_same_label_negatives() -> None:
    fnd = GloFND(10, 0.1, mode="oracle")
    labels, candidate_labels = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0, 2, 1])
    neg = torch.ones(3, 5, dtype=torch.bool)
    neg[0, 0] = neg[1, 1] = neg[2, 3] = False                                   # the positives
    keep = fnd.keep_mask(torch.rand(3, 5), torch.arange(3), 0, neg, labels, candidate_labels)
    expected = [[not (neg[i, j] and labels[i] == candidate_labels[j]) for j in range(5)] for i in range(3)]
    assert keep.tolist() == expected
    square = fnd.keep_mask(torch.rand(3, 3), torch.arange(3), 0, ~torch.eye(3, dtype=torch.bool), labels)
    assert square.all()                                                         # candidate_labels default to labels


def test_mode_none_keeps_everything() -> None:
    fnd = GloFND(6, 0.5, mode="none")
    sim = torch.rand(4, 6)
    assert fnd.update(sim, torch.arange(4), 0) == {"updated_rows": 0.0}
    assert fnd.keep_mask(sim, torch.arange(4), 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu, gpu = GloFND(50, 0.1), GloFND(50, 0.1, device="cuda")
    for _ in range(20):
        ids = torch.randint(50, (16,))                                          # duplicates included
        sim, neg = torch.rand(16, 24) * 2 - 1, torch.rand(16, 24) < 0.9
        stats_cpu = cpu.update(sim, ids, 0, neg)
        stats_gpu = gpu.update(sim.cuda(), ids.cuda(), 0, neg.cuda())
        assert stats_gpu == pytest.approx(stats_cpu, abs=1e-5)
        torch.testing.assert_close(gpu.threshold.cpu(), cpu.threshold)
        cpu.import_rows(ids, gpu.export_rows(ids.cuda()))                       # same λ bits, so masks must agree
        keep = gpu.keep_mask(sim.cuda(), ids.cuda(), 0, neg.cuda())
        assert keep.is_cuda and torch.equal(keep.cpu(), cpu.keep_mask(sim, ids, 0, neg))
        assert gpu.keep_mask(sim.cuda().bfloat16(), ids.cuda(), 0, neg.cuda()).shape == (16, 24)
    gpu.to("cpu")
    assert gpu.threshold.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_and_mask_cuda_matches_cpu() -> None:
    cpu, gpu = GloFND(50, 0.1, init="quantile"), GloFND(50, 0.1, init="quantile", device="cuda")
    for _ in range(10):
        ids, sim, positive = torch.randint(50, (16,)), torch.rand(16, 24) * 2 - 1, torch.randint(24, (16,))
        keep_cpu, lam_cpu = cpu.update_and_mask(sim, ids, 0, positive)
        keep_gpu, lam_gpu = gpu.update_and_mask(sim.cuda(), ids.cuda(), 0, positive.cuda())
        torch.testing.assert_close(lam_gpu.cpu(), lam_cpu)
        expected = sim <= lam_gpu.cpu()[:, None]                                 # the mask of the GPU's own λ
        expected[torch.arange(16), positive] = True
        assert keep_gpu.is_cuda and torch.equal(keep_gpu.cpu(), expected)
        cpu.import_rows(ids, gpu.export_rows(ids.cuda()))                       # same λ bits from here on
