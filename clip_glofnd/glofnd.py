"""GloFND: learned per-anchor thresholds that find false negatives (Balmaseda et al., ICML 2025, arXiv 2502.20612).

Each anchor i (one :class:`GloFND` per anchor modality: image anchors, text anchors) keeps a scalar λ_i that tracks
the (1 − α) quantile of i's similarities to *all* its negatives in the dataset, i.e. the minimiser of

    F_i(λ) = α·λ + mean_{j ∈ neg(i)} (s_ij − λ)_+

whose stochastic subgradient on the negatives of i in a mini-batch is

    g_i = α − mean_{j ∈ neg(i)} 1[s_ij > λ_i].

Only the anchors in the batch are updated, each with its own Adam step (moments m_i, v_i, visit count steps_i);
λ is clamped to [−1, 1]. Negatives with s_ij > λ_i are false negatives and leave i's contrastive denominator;
positives never do. Cost per call is O(B·M), state is O(n). DESIGN.md §1 has the rest. `update` and `keep_mask` take
any negative mask; the trainer calls `update_and_mask`, the same two steps in one call for its negatives (every column
but the row's positive), bit for bit equal and cheaper (no [B, M] negative mask to build, count or apply).

Starting point (``init``): ``"one"`` is the paper's λ = 1 (nothing filtered until λ has walked down, one Adam step
per visit). ``"quantile"`` warm-starts: the first time a sample is updated its λ is set to its row's mini-batch
(1 − α) quantile over negatives (what ``fnd`` computes; the mean over its rows if the id repeats), with no Adam step
on that visit, and Adam goes on from there on later visits.

Bias correction: λ_i is its own parameter, updated only when i is in a batch, so by default (``"sample"``) Adam's
bias correction uses the row's own number of Adam steps t_i. ``"epoch"`` is the authors' code exactly: t = epoch + 1
with the absolute epoch, whatever the start epoch, which shrinks a sample's first steps (first updated at epoch 15,
their CC3M start, λ moves by ~0.46·lr instead of lr); it equals ``"sample"`` only when learning starts at epoch 0 and
every sample is seen exactly once per epoch. Pure tensor code: no I/O, no torch.distributed, no globals.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MODES = ("none", "glofnd", "fnd", "oracle")
INITS = ("one", "quantile")
BIAS_CORRECTIONS = ("sample", "epoch")
STATE_KEYS = ("lam", "m", "v", "steps")
_QUANTILE_MAX_NUMEL = 1 << 24  # torch.(nan)quantile refuses larger inputs
_COUNT_CHUNK = 32767           # int16 partial row sums are exact up to this many columns


def row_count(mask: Tensor) -> Tensor:
    """Number of True entries per row of a [B, M] bool mask, float32 [B].

    Sums in int16 over ≤ 32767 columns at a time: exact, and on CPU ~15x faster than a bool → int32/float sum.
    """
    count = torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
    for chunk in mask.split(_COUNT_CHUNK, dim=1):
        count += chunk.sum(1, dtype=torch.int16)
    return count


def count_above(sim: Tensor, lam_rows: Tensor, neg_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per row: number of negatives with s_ij > λ_i, and number of negatives (float32 [B] each)."""
    above = sim > lam_rows[:, None]                                             # [B, M] bool
    if neg_mask is None:
        return row_count(above), torch.full_like(lam_rows, sim.shape[1], dtype=torch.float32)
    return row_count(above.logical_and_(neg_mask)), row_count(neg_mask)


def count_above_except(sim: Tensor, lam_rows: Tensor, positive: Tensor | None) -> tuple[Tensor, Tensor]:
    """`count_above` for the trainer's negatives: every column of row i except `positive[i]` (None: every column).

    The negatives are then M − 1 per row, known without counting, and the positive's own comparison is subtracted
    from the row count instead of masking the [B, M] comparison; the same float32 integers as `count_above` with
    neg_mask = all but (i, positive[i]).
    """
    above = sim > lam_rows[:, None]                                             # [B, M] bool
    count = row_count(above)                                                    # [B]
    if positive is None:
        return count, torch.full_like(count, sim.shape[1])
    count -= above.gather(1, positive[:, None]).squeeze(1).float()             # [B] the positive is not a negative
    return count, torch.full_like(count, sim.shape[1] - 1)


def negatives_except(positive: Tensor | None, shape: tuple[int, int]) -> Tensor | None:
    """[B, M] bool negative mask, True everywhere but (i, positive[i]); None when `positive` is None (all negatives)."""
    if positive is None:
        return None
    neg = torch.ones(shape, dtype=torch.bool, device=positive.device)
    return neg.scatter_(1, positive[:, None], False)


def quantile_grad(sim: Tensor, lam_rows: Tensor, neg_mask: Tensor | None, alpha: float) -> Tensor:
    """g_i = α − mean_{j ∈ neg(i)} 1[s_ij > λ_i], the subgradient of F_i at λ_i; 0 for rows without negatives."""
    above, negatives = count_above(sim, lam_rows, neg_mask)                     # [B], [B]
    return torch.where(negatives > 0, alpha - above / negatives.clamp_min(1), 0.0)


def adam_step(
        lam: Tensor, m: Tensor, v: Tensor, grad: Tensor, t: Tensor | int, *, lr: float, betas: tuple[float, float],
        eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step (Kingma & Ba, Alg. 1, in torch.optim.Adam's arithmetic) on rows; t ≥ 1 is the bias-correction
    count (int or [b]). Returns new (λ clamped to [−1, 1], m, v)."""
    beta1, beta2 = betas
    m = m.lerp(grad, 1 - beta1)
    v = v * beta2 + (1 - beta2) * grad * grad
    if isinstance(t, Tensor):
        t = t.to(torch.float64)
    else:                                                                         # a fill kernel, not a host copy
        t = torch.full((), float(t), dtype=torch.float64, device=lam.device)
    bias1 = (1 - beta1 ** t).to(lam.dtype)
    bias2_sqrt = (1 - beta2 ** t).sqrt().to(lam.dtype)
    lam = (lam - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps)).clamp(-1.0, 1.0)
    return lam, m, v


def keep_mask_from_threshold(sim: Tensor, thresholds: Tensor, neg_mask: Tensor | None) -> Tensor:
    """[B, M] bool, True = stays: every non-negative, and negatives with s_ij ≤ threshold_i (NaN keeps all)."""
    is_fn = sim > thresholds[:, None]                                            # [B, M] false negatives
    if neg_mask is not None:
        is_fn.logical_and_(neg_mask)
    return is_fn.logical_not_()


def minibatch_quantile(sim: Tensor, neg_mask: Tensor | None, alpha: float) -> Tensor:
    """Per-row (1 − α) quantile of that row's negatives in this batch (the `fnd` baseline); NaN for rows without."""
    values = sim.float() if neg_mask is None else sim.float().masked_fill(~neg_mask, math.nan)   # [B, M]
    rows_per_chunk = max(1, _QUANTILE_MAX_NUMEL // max(1, sim.shape[1]))
    return torch.cat([torch.nanquantile(chunk, 1 - alpha, dim=1) for chunk in values.split(rows_per_chunk)])


def oracle_keep_mask(labels: Tensor, candidate_labels: Tensor, neg_mask: Tensor | None) -> Tensor:
    """[B, M] bool, False exactly where column j is a negative of row i with the same label (a true false negative)."""
    is_fn = labels[:, None] == candidate_labels[None, :]                         # [B, M]
    if neg_mask is not None:
        is_fn.logical_and_(neg_mask)
    return ~is_fn


def group_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Group equal ids without a host sync: slot [B] (rows with the same id share a slot) and slot_ids [B] (the id of
    each slot; slots past the number of unique ids are unused and hold 0)."""
    sorted_ids, order = ids.sort()
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = torch.empty_like(ids).scatter_(0, order, starts.cumsum(0) - 1)       # [B] index into unique ids
    slot_ids = torch.zeros_like(ids).scatter_(0, slot, ids)                      # equal values per slot: no race
    return slot, slot_ids


def _is_index_vector(x: Tensor) -> bool:
    """A 1-D integer tensor (not bool, float or complex)."""
    return x.dim() == 1 and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


class GloFND:
    """Per-sample thresholds λ [n] for one anchor modality: `update` learns them, `keep_mask` filters negatives.

    Modes: ``none`` (keep everything), ``glofnd`` (learned λ), ``fnd`` (per-row mini-batch (1 − α) quantile, the
    local baseline), ``oracle`` (same label = false negative; analysis only). Before `start_epoch` nothing learns;
    before `mask_start_epoch` (default `start_epoch`) every negative is kept. State tensors live on `device`.
    """

    def __init__(
            self, num_samples: int, alpha: float, lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.98),
            eps: float = 1e-8, start_epoch: int = 0, mask_start_epoch: int | None = None, mode: str = "glofnd",
            device: torch.device | str | None = None, bias_correction: str = "sample", init: str = "one",
    ) -> None:
        mask_start_epoch = start_epoch if mask_start_epoch is None else mask_start_epoch
        checks = [  # (ok, what is wrong)
            (int(num_samples) == num_samples > 0, f"num_samples must be a positive int, got {num_samples}"),
            (0.0 < alpha < 1.0, f"alpha must be in (0, 1), got {alpha}"),
            (lr > 0.0, f"lr must be > 0, got {lr}"),
            (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"betas must be 2 values in [0, 1), got {betas}"),
            (eps > 0.0, f"eps must be > 0, got {eps}"),
            (start_epoch >= 0, f"start_epoch must be >= 0, got {start_epoch}"),
            (mask_start_epoch >= start_epoch,
             f"mask_start_epoch ({mask_start_epoch}) must be >= start_epoch ({start_epoch})"),
            (mode in MODES, f"mode must be one of {MODES}, got {mode!r}"),
            (bias_correction in BIAS_CORRECTIONS,
             f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}"),
            (init in INITS, f"init must be one of {INITS}, got {init!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GloFND: {message}")
        self.num_samples, self.alpha, self.lr, self.betas, self.eps = int(num_samples), alpha, lr, tuple(betas), eps
        self.start_epoch, self.mask_start_epoch, self.mode = start_epoch, mask_start_epoch, mode
        self.bias_correction, self.init = bias_correction, init
        n = self.num_samples
        self.lam = torch.ones(n, dtype=torch.float32, device=device)              # [n] thresholds λ
        self.m = torch.zeros(n, dtype=torch.float32, device=device)               # [n] Adam first moments
        self.v = torch.zeros(n, dtype=torch.float32, device=device)               # [n] Adam second moments
        self.steps = torch.zeros(n, dtype=torch.int32, device=device)             # [n] visits (updates) per sample

    @property
    def threshold(self) -> Tensor:
        """λ, float32 [num_samples] (the live tensor, not a copy)."""
        return self.lam

    def to(self, device: torch.device | str) -> GloFND:
        """Move the state to `device`; returns self."""
        for key in STATE_KEYS:
            setattr(self, key, getattr(self, key).to(device))
        return self

    @torch.no_grad()
    def update(self, sim: Tensor, ids: Tensor, epoch: int, neg_mask: Tensor | None = None) -> dict[str, float]:
        """One Adam step on λ of the anchors in `ids` from the batch similarities `sim` [B, M] (detached).

        With init="quantile" a sample's first visit sets its λ to its rows' mini-batch (1 − α) quantile instead of
        taking a step. An id present several times takes ONE step with the mean gradient of its rows. Returns floats
        for logging:
        updated_rows, lam_mean and grad_mean over the updated ids, above_frac (fraction of negatives above λ before
        the step); only updated_rows (0) when nothing learns (mode other than glofnd, or epoch < start_epoch).
        """
        sim, ids, neg_mask = self._check(sim, ids, neg_mask)
        if not self._learns(sim, epoch):
            return {"updated_rows": 0.0}
        above, negatives = count_above(sim, self.lam[ids].to(sim.device), neg_mask)          # [B], [B]
        _, stats = self._step(sim, ids, epoch, above, negatives,
                              lambda rows: None if neg_mask is None else neg_mask[rows])
        return dict(zip(("updated_rows", "lam_mean", "grad_mean", "above_frac"), stats.tolist()))

    @torch.no_grad()
    def update_and_mask(
            self, sim: Tensor, ids: Tensor, epoch: int, positive: Tensor | None = None, labels: Tensor | None = None,
            candidate_labels: Tensor | None = None, learn_epoch: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`update` then `keep_mask` in one call, for the trainer: the negatives of row i are every column but
        `positive[i]` ([B] int, the column of i's positive; None: every column is a negative). λ learns as
        `update(..., learn_epoch)` would (default `epoch`: the state warm-up passes a later one so that λ learns
        before start_epoch); the mask is that of `epoch`.

        Returns (keep [B, M] bool on sim's device, λ rows of `ids` after the update [B]), bit for bit what
        update(sim, ids, epoch, neg) followed by keep_mask(sim, ids, epoch, neg, labels, candidate_labels) give with
        neg = all but (i, positive[i]), and the same state. Cheaper: one validation (one host sync, no statistics),
        the negatives counted as M − 1 instead of summing a [B, M] mask, the positive's column patched on [B]
        entries instead of an and with a [B, M] mask, and the mask compared as `sim <= λ` in one op. Two [B, M]
        comparisons remain: the gradient needs λ before the step and the mask uses λ after it (the authors' order).
        """
        sim, ids, positive = self._check_positive(sim, ids, positive)
        labels, candidate_labels = self._check_labels(sim, labels, candidate_labels)
        keep, lam_rows = self.update_and_mask_unchecked(sim, ids, epoch, positive, labels, candidate_labels,
                                                        learn_epoch)
        return keep, self.lam[ids].to(sim.device) if lam_rows is None else lam_rows

    @torch.no_grad()
    def update_and_mask_unchecked(
            self, sim: Tensor, ids: Tensor, epoch: int, positive: Tensor | None = None, labels: Tensor | None = None,
            candidate_labels: Tensor | None = None, learn_epoch: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`update_and_mask` without its validation, for a caller that validated its inputs where they entered (the
        trainer: ids are range-checked on the CPU by the loader): no host read, nothing that waits for the device, and
        no graph break under torch.compile with init="one". sim [B, M] float (non-finite entries are allowed: they
        count as not above λ); ids [B] integer on the state device, in [0, num_samples); positive [B] integer columns
        on sim's device (or None); labels / candidate_labels as `keep_mask` (oracle mode). The λ rows returned are None
        in modes other than glofnd (no per-sample state). With init="quantile" the first-visit rows are found with one
        host read (`nonzero`).
        """
        if not sim.is_floating_point() or sim.dtype == torch.float64:
            sim = sim.float()
        if self.mode != "glofnd":
            return self._baseline_mask(sim, epoch, positive, labels, candidate_labels), None
        ids = ids.to(self.lam.device, torch.long)
        lam_rows = self.lam[ids].to(sim.device)                                   # [B] λ before the step
        learn_epoch = epoch if learn_epoch is None else learn_epoch
        if self._learns(sim, learn_epoch):
            above, negatives = count_above_except(sim, lam_rows, positive)        # [B], [B]
            new_rows, _ = self._step(sim, ids, learn_epoch, above, negatives,
                                     lambda rows: None if positive is None else negatives_except(
                                         positive[rows], (len(rows), sim.shape[1])))
            lam_rows = new_rows.to(sim.device)                                    # [B] λ after the step
        if epoch < self.mask_start_epoch or sim.numel() == 0:
            return torch.ones(sim.shape, dtype=torch.bool, device=sim.device), lam_rows
        keep = sim <= lam_rows.nan_to_num(nan=math.inf)[:, None]                  # [B, M]; NaN λ keeps all
        if positive is not None:
            keep.scatter_(1, positive[:, None], True)                             # the positive always stays
        return keep, lam_rows

    def _baseline_mask(self, sim: Tensor, epoch: int, positive: Tensor | None, labels: Tensor | None,
                       candidate_labels: Tensor | None) -> Tensor:
        """The keep mask [B, M] of the stateless modes (none, fnd, oracle) for negatives = all but `positive`."""
        if self.mode == "none" or epoch < self.mask_start_epoch or sim.numel() == 0:
            return torch.ones(sim.shape, dtype=torch.bool, device=sim.device)
        neg = negatives_except(positive, tuple(sim.shape))                        # [B, M] baselines: build it
        if self.mode == "fnd":
            return keep_mask_from_threshold(sim, minibatch_quantile(sim, neg, self.alpha), neg)
        return oracle_keep_mask(labels, candidate_labels, neg)

    def _learns(self, sim: Tensor, epoch: int) -> bool:
        """Whether `update` changes λ at `epoch` (mode glofnd, from start_epoch on, a non-empty batch)."""
        return self.mode == "glofnd" and epoch >= self.start_epoch and sim.numel() > 0

    def _step(
            self, sim: Tensor, ids: Tensor, epoch: int, above: Tensor, negatives: Tensor,
            neg_rows: Callable[[Tensor], Tensor | None],
    ) -> tuple[Tensor, Tensor]:
        """The Adam step (or first-visit quantile) of the ids from per-row counts of negatives above λ and of
        negatives; writes the state. Returns λ per row after the step [B] (state device) and the statistics
        [updated_rows, lam_mean, grad_mean, above_frac] as one tensor. `neg_rows(rows)` is the negative mask of those
        rows of sim (for the first-visit quantile)."""
        above, negatives = above.to(self.lam.device), negatives.to(self.lam.device)
        slot, slot_ids = group_rows(ids)                                          # [B], [B]
        has_neg = (negatives > 0).float()                                         # [B]
        grad = has_neg * (self.alpha - above / negatives.clamp_min(1))            # [B] g_i per row
        count = torch.zeros_like(has_neg).index_add_(0, slot, has_neg)            # [B] rows with negatives per slot
        grad = torch.zeros_like(grad).index_add_(0, slot, grad) / count.clamp_min(1)  # [B] mean g per unique id
        active = count > 0                                                        # [B] slots that take a step
        lam, m, v, steps = (getattr(self, key)[slot_ids] for key in STATE_KEYS)
        warm = self.init == "quantile"
        t = (steps + 1 - int(warm)).clamp_min(1) if self.bias_correction == "sample" else epoch + 1
        new = list(adam_step(lam, m, v, grad, t, lr=self.lr, betas=self.betas, eps=self.eps))
        if warm:                                                                  # first visit: λ = batch quantile
            first = active & (steps == 0)                                         # [B] slots seen for the first time
            new = [self._first_visit_lam(sim, neg_rows, slot, has_neg, first, new[0]),
                   torch.where(first, m, new[1]), torch.where(first, v, new[2])]  # no Adam step on that visit
        new = [torch.where(active, a, b) for a, b in zip(new, (lam, m, v))] + [steps + active.int()]
        for key, value in zip(STATE_KEYS, new):
            getattr(self, key)[ids] = value[slot]                                 # duplicates write equal values
        n_active = active.sum().float()
        stats = torch.stack([
            n_active, (new[0] * active).sum() / n_active.clamp_min(1), (grad * active).sum() / n_active.clamp_min(1),
            above.sum() / negatives.sum().clamp_min(1),
        ])
        return new[0][slot], stats

    def _first_visit_lam(self, sim: Tensor, neg_rows: Callable[[Tensor], Tensor | None], slot: Tensor,
                         has_neg: Tensor, first: Tensor, lam_slots: Tensor) -> Tensor:
        """λ per slot [B] with first-visited slots set to their rows' mean mini-batch (1 − α) quantile over negatives;
        the quantile is computed only for those rows (one host sync to find them)."""
        rows = (first[slot] & (has_neg > 0)).nonzero().squeeze(1)                  # [r] rows of first-visited ids
        if len(rows) == 0:
            return lam_slots
        at = rows.to(sim.device)
        q = minibatch_quantile(sim[at], neg_rows(at), self.alpha)                 # [r]
        q = q.to(lam_slots.device, lam_slots.dtype)
        total = torch.zeros_like(lam_slots).index_add_(0, slot[rows], q)          # [B] per slot
        count = torch.zeros_like(lam_slots).index_add_(0, slot[rows], torch.ones_like(q))
        return torch.where(first, (total / count.clamp_min(1)).clamp(-1.0, 1.0), lam_slots)

    @torch.no_grad()
    def keep_mask(
            self, sim: Tensor, ids: Tensor, epoch: int, neg_mask: Tensor | None = None, labels: Tensor | None = None,
            candidate_labels: Tensor | None = None,
    ) -> Tensor:
        """[B, M] bool on sim's device, True = stays in row i's denominator; non-negatives are always True.

        `labels` [B] and `candidate_labels` [M] (default `labels` when M == B) are needed only in oracle mode.
        Duplicated ids use their single λ.
        """
        sim, ids, neg_mask = self._check(sim, ids, neg_mask)
        labels, candidate_labels = self._check_labels(sim, labels, candidate_labels)
        if self.mode == "none" or epoch < self.mask_start_epoch or sim.numel() == 0:
            return torch.ones(sim.shape, dtype=torch.bool, device=sim.device)
        if self.mode == "glofnd":
            return keep_mask_from_threshold(sim, self.lam[ids].to(sim.device), neg_mask)
        if self.mode == "fnd":
            return keep_mask_from_threshold(sim, minibatch_quantile(sim, neg_mask, self.alpha), neg_mask)
        return oracle_keep_mask(labels, candidate_labels, neg_mask)

    def state_dict(self) -> dict[str, Tensor]:
        """Per-sample state {lam, m, v, steps}; tensors are shared, not copied (as nn.Module.state_dict)."""
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy a `state_dict()` in (to this object's device); sizes must match num_samples."""
        missing = [key for key in STATE_KEYS if key not in state_dict]
        unexpected = [key for key in state_dict if key not in STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"GloFND.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for key in STATE_KEYS:
            shape = tuple(state_dict[key].shape)
            if shape != (self.num_samples,):
                raise ValueError(
                    f"GloFND.load_state_dict: {key!r} has shape {shape}, expected ({self.num_samples},); the state was "
                    f"saved for another num_samples (--train-num-samples)")
        for key in STATE_KEYS:
            getattr(self, key).copy_(state_dict[key])

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]:
        """Copies of the state rows of `ids` (for distributed sync). No validation of the values: ids [R] integer in
        [0, num_samples) (the trainer's are checked where they enter; a host read here would wait for the device at
        every step)."""
        ids = ids.to(self.lam.device, torch.long)
        return {key: getattr(self, key)[ids] for key in STATE_KEYS}

    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None:
        """Write `export_rows` output back; for a repeated id the first occurrence wins (same result on every rank).
        Shapes are checked, id values are not (see `export_rows`)."""
        ids = ids.to(self.lam.device, torch.long)
        for key in STATE_KEYS:
            if key not in rows or tuple(rows[key].shape) != tuple(ids.shape):
                got = tuple(rows[key].shape) if key in rows else "missing"
                raise ValueError(f"GloFND.import_rows: rows[{key!r}] must have shape {tuple(ids.shape)}, got {got}")
        slot, _ = group_rows(ids)                                                 # [B]
        position = torch.arange(len(ids), device=ids.device)
        first = torch.zeros_like(ids).scatter_reduce_(0, slot, position, "amin", include_self=False)[slot]   # [B]
        for key in STATE_KEYS:
            state = getattr(self, key)
            state[ids] = rows[key].to(state.device, state.dtype)[first]

    def _check_ids(self, ids: Tensor, batch: int | None = None, extra: tuple[Tensor, ...] = ()
                   ) -> tuple[Tensor, list[float]]:
        """ids as int64 on the state device, plus the `extra` scalars fetched in the same host sync; ValueError for a
        wrong shape/dtype or ids outside [0, num_samples)."""
        if not _is_index_vector(ids) or (batch is not None and len(ids) != batch):
            want = f"[{batch}] (one per row of sim)" if batch is not None else "[B]"
            raise ValueError(
                f"GloFND: ids must be an integer tensor of shape {want}, got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.to(self.lam.device, torch.long)
        bad = ((ids < 0) | (ids >= self.num_samples)).sum().float()
        n_bad, *extra = torch.stack([bad, *(x.to(ids.device, torch.float32) for x in extra)]).tolist()
        if n_bad:
            raise ValueError(
                f"GloFND: {int(n_bad)} of {len(ids)} ids outside [0, {self.num_samples}) (min {int(ids.min())}, "
                f"max {int(ids.max())}); ids must be global sample ids below num_samples")
        return ids, extra

    def _check(self, sim: Tensor, ids: Tensor, neg_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate shapes, ids and finiteness with one host sync; returns (sim compared in float32, ids, neg_mask)."""
        self._check_sim_shape(sim)
        if neg_mask is not None and (tuple(neg_mask.shape) != tuple(sim.shape) or neg_mask.dtype != torch.bool):
            raise ValueError(
                f"GloFND: neg_mask must be a bool tensor shaped like sim {tuple(sim.shape)}, "
                f"got {tuple(neg_mask.shape)} {neg_mask.dtype}")
        sim, ids, _ = self._check_values(sim, ids)
        return sim, ids, neg_mask

    def _check_positive(self, sim: Tensor, ids: Tensor, positive: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
        """`_check` for `update_and_mask`: positive [B] integer columns in [0, M) (or None) instead of a neg_mask."""
        self._check_sim_shape(sim)
        if positive is None:
            sim, ids, _ = self._check_values(sim, ids)
            return sim, ids, None
        if not _is_index_vector(positive) or len(positive) != sim.shape[0]:
            raise ValueError(f"GloFND: positive must be an integer tensor of shape [{sim.shape[0]}] (the column of "
                             f"each row's positive), got {tuple(positive.shape)} {positive.dtype}")
        positive = positive.to(sim.device, torch.long)
        sim, ids, n_bad = self._check_values(sim, ids, ((positive < 0) | (positive >= sim.shape[1])).sum())
        if n_bad:
            raise ValueError(f"GloFND: {int(n_bad)} of {len(positive)} positive columns outside [0, {sim.shape[1]})")
        return sim, ids, positive

    @staticmethod
    def _check_sim_shape(sim: Tensor) -> None:
        if sim.dim() != 2 or not sim.is_floating_point():
            raise ValueError(f"GloFND: sim must be a 2-D float tensor [B, M], got {tuple(sim.shape)} {sim.dtype}")

    def _check_values(self, sim: Tensor, ids: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor, float]:
        """ids range, sim finiteness and `extra` (a scalar, returned) in one host sync; sim promoted to float32 if it
        is not a float16/bfloat16/float32 tensor."""
        if sim.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            sim = sim.float()                                                     # half types promote exactly
        extras = (sim.sum(dtype=torch.float32),) + (() if extra is None else (extra,))
        ids, values = self._check_ids(ids, batch=sim.shape[0], extra=extras)
        if not math.isfinite(values[0]):                                          # a finite sum ⇒ all entries finite
            n_bad = int((~torch.isfinite(sim)).sum())
            if n_bad:
                raise ValueError(f"GloFND: sim has {n_bad} of {sim.numel()} entries not finite (NaN or inf)")
        return sim, ids, values[1] if extra is not None else 0.0

    def _check_labels(
            self, sim: Tensor, labels: Tensor | None, candidate_labels: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validate labels [B] and candidate_labels [M] (default: labels when M == B); oracle mode needs both."""
        if candidate_labels is None and labels is not None and sim.shape[0] == sim.shape[1]:
            candidate_labels = labels
        for name, value, size in (("labels", labels, len(sim)), ("candidate_labels", candidate_labels, sim.shape[1])):
            if value is None and self.mode == "oracle":
                raise ValueError(f"GloFND: mode 'oracle' needs {name} (shape [{size}])")
            if value is not None and tuple(value.shape) != (size,):
                raise ValueError(f"GloFND: {name} must have shape [{size}], got {tuple(value.shape)}")
        return labels, candidate_labels
