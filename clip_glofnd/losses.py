"""Contrastive losses that take GloFND keep masks: CLIP InfoNCE, SogCLR / FastCLIP-v1 and FastCLIP-v3.

All three share one call and one masking contract (DESIGN.md §1, step 4)::

    loss, metrics = loss_fn(img, txt, img_all, txt_all, ids=ids, ids_all=ids_all, epoch=epoch,
                            keep_i2t=keep_i2t, keep_t2i=keep_t2i, offset=offset, logit_scale=logit_scale)

`img`, `txt` [b, d] are this rank's L2-normalised features, `img_all`, `txt_all` [B, d] the gathered global batch
(gathered with gradient; with one process they are `img`, `txt` and offset 0). Local row i's positive is column
`offset + i`. `keep_i2t` [b, B] (image anchors vs all texts) and `keep_t2i` [b, B] (text anchors vs all images) are
True where a negative stays; the positive always stays, whatever the mask says there. Every anchor's negatives are
renormalised by the number it kept, K_i, out of its N_i = B − 1 negatives. The loss is the mean over local anchors
of the average of the two directions (as open_clip's ClipLoss), so averaging gradients over ranks (DDP) gives the
gradient of the single-process loss on the global batch, provided every rank has the same b.

CLIP (mini-batch InfoNCE, τ = 1 / logit_scale from the model)::

    ℓ_i = −log( e^{s_ii/τ} / (e^{s_ii/τ} + (N_i/K_i)·Σ_{j kept} e^{s_ij/τ}) )     (K_i = 0: ℓ_i = 0)

computed as logsumexp over {s_ii/τ} ∪ {s_ij/τ + log(N_i/K_i) : j kept}; with nothing filtered it is
open_clip.loss.ClipLoss exactly.

SogCLR / FastCLIP-v1 (global contrastive loss, constant τ) and FastCLIP-v3 (global learnable τ). Per direction,
for local anchor i with global id k::

    g_i  = (1/K_i)·Σ_{j kept} exp((s_ij − s_ii)/τ)                     mean over kept negatives (all of them: K_i = N_i)
    u_k ← (1 − γ)·u_k + γ·g_i        (u_k = g_i while unset: u_k ≤ 1e-35 or non-finite, as FastCLIP)
    ℓ_i  = τ·log(ε + u_k)  in value, with gradient  τ·∇g_i / (ε + u_k)              (u detached)
    L    = mean_i ½(ℓ_i^{i2t} + ℓ_i^{t2i})      (+ ρ·τ for FastCLIP-v3)

i.e. a stochastic estimate of the gradient of τ·log(ε + g) (SogCLR, Yuan et al. ICML 2022; FastCLIP, Wei et al.,
arXiv 2407.01445, Alg. 1) whose *value* is the moving-average estimate of the objective instead of FastCLIP's
surrogate g/u. γ follows `gamma_schedule` (FastCLIP's cosine inner rate; constant γ = SogCLR). Anchors with no kept
negative (K_i = 0) contribute nothing and leave u_k unchanged; an id present twice among the local anchors takes one
moving-average step with the mean of its rows' g. Only the local anchors' rows of u change; keep the ranks in step
with distributed.sync_rows([loss_fn], ids, dist) (export_rows / import_rows).

Matched against the FastCLIP reference code (Optimization-AI/fast_clip, src/fast_clip/loss.py, and the GloFND authors'
fork vibalcam/GloFND, bimodal/src/fast_clip/loss.py), read, not copied:
- g is the mean over negatives (FastCLIP divides by B − 1; GloFND's fork by the kept count, as here), u is the
  updated value, ε = 1e-14, γ = 1 at epoch 0 then cosine to γ_min over `gamma_decay_epochs` (FastCLIP's
  adjust_gamma), unset-u reset. Defaults are the GloFND CC3M recipe: v1 τ = 0.03; v3 τ₀ = 0.07, ρ = 6.5; γ_min = 0.2
  over 18 epochs (half of 37).
- v1: FastCLIP's v1 gradient is ∇g/(ε + u) without the factor τ; here it is multiplied by τ (the gradient of
  τ·log g, same scale as CLIP's cross-entropy). Adam is invariant to that constant; gradient clipping is not.
- v3: τ = exp(−log_inv_tau), the same parametrisation as open_clip's / FastCLIP's `logit_scale`, so FastCLIP's
  lr_tau (2e-4) applies to `log_inv_tau`; `clamp_tau_()` after each optimizer step keeps τ in [tau_min, tau_max]
  (FastCLIP clamps logit_scale to [0, ln 100], i.e. τ ∈ [0.01, 1]). With ``tau_grad="fastclip"`` (default) the
  τ-gradient is FastCLIP's estimator exactly:

      ∂L/∂τ = mean_i [ τ·Σ_d ∂_τ g_i^d/(ε + u^d) + ½·Σ_d log(ε + u^d) ] + ρ

  where the g-term counts both directions in full while the features get their average. That is what the reference
  code computes (its loss1/loss2 halves each carry the τ-path; verified against a re-derivation of that procedure in
  tests/test_losses.py). ``tau_grad="objective"`` gives instead the gradient of mean_i ½Σ_d τ·log(ε + g^d) + ρτ:
  mean_i ½·Σ_d [τ·∂_τ g_i^d/(ε + u^d) + log(ε + u^d)] + ρ. Both have the same value and feature gradients.

Pure tensor code: no I/O, no torch.distributed, device taken from the inputs. Similarities are computed in at least
float32 with autocast off (exp((s_ij − s_ii)/τ) at τ = 0.01 amplifies bf16 rounding a hundredfold).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("clip", "sogclr", "fastclip")
_ALIASES = {"infonce": "clip", "fastclip-v1": "sogclr", "fastclip-v3": "fastclip"}
_UNSET_U = 1e-35                                   # FastCLIP treats u at or below this (or non-finite) as unset
_F32_MAX = torch.finfo(torch.float32).max


def gamma_schedule(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """Inner rate γ of the u moving averages at `epoch` (FastCLIP's cosine schedule).

    γ = 1 at epoch 0, then ½(1 + cos(π·epoch/E))·(1 − γ_min) + γ_min, and γ_min from epoch E = `decay_epochs` on.
    E ≤ 0 gives a constant γ_min at every epoch (SogCLR's constant rate).
    """
    if not 0.0 < gamma_min <= 1.0:
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min}")
    if decay_epochs <= 0:
        return float(gamma_min)
    if epoch >= decay_epochs:
        return float(gamma_min)
    return 0.5 * (1.0 + math.cos(math.pi * max(epoch, 0) / decay_epochs)) * (1.0 - gamma_min) + gamma_min


def positive_mask(b: int, B: int, offset: int, device: torch.device) -> Tensor:
    """[b, B] bool, True at (i, offset + i): local row i's positive in the gathered batch."""
    cols = torch.arange(B, device=device)
    return cols[None, :] == (torch.arange(b, device=device) + offset)[:, None]


def kept_negatives(keep: Tensor | None, is_pos: Tensor) -> Tensor:
    """[b, B] bool, True where a negative stays in the denominator (never the positive)."""
    return ~is_pos if keep is None else keep.to(is_pos.device, torch.bool) & ~is_pos


def info_nce_rows(logits: Tensor, offset: int, keep: Tensor | None) -> Tensor:
    """Per-anchor InfoNCE [b] on logits [b, B] (positive at column offset + i), negatives renormalised by N_i/K_i."""
    b, B = logits.shape
    labels = torch.arange(b, device=logits.device) + offset                         # [b]
    if keep is None:
        return F.cross_entropy(logits, labels, reduction="none")
    is_pos = positive_mask(b, B, offset, logits.device)                               # [b, B]
    kept = kept_negatives(keep, is_pos)                                               # [b, B]
    n_kept = kept.sum(1)                                                              # [b] K_i
    log_ratio = math.log(max(B - 1, 1)) - n_kept.clamp_min(1).to(logits.dtype).log()  # [b] log(N_i / K_i)
    z = torch.where(kept, logits + log_ratio[:, None], float("-inf"))                # [b, B] removed → −inf
    z = torch.where(is_pos, logits, z)                                                # the positive always stays
    return torch.logsumexp(z, 1) - logits.gather(1, labels[:, None]).squeeze(1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _similarity(anchors: Tensor, candidates: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """scale · anchors @ candidates.T in at least float32, autocast off: [b, B]."""
    dtype = _compute_dtype(anchors)
    with torch.autocast(anchors.device.type, enabled=False):
        return scale * anchors.to(dtype) @ candidates.to(dtype).T


def _check_inputs(
        img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, ids: Tensor | None, ids_all: Tensor | None,
        keep_i2t: Tensor | None, keep_t2i: Tensor | None, offset: int,
) -> None:
    """ValueError naming the argument when shapes do not fit the contract."""
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"img and txt must both be [b, d], got {tuple(img.shape)} and {tuple(txt.shape)}")
    b, d = img.shape
    if img_all.shape != txt_all.shape or img_all.dim() != 2 or img_all.shape[1] != d:
        raise ValueError(f"img_all and txt_all must both be [B, {d}], got {tuple(img_all.shape)} and "
                         f"{tuple(txt_all.shape)}")
    B = img_all.shape[0]
    if not 0 <= offset <= B - b:
        raise ValueError(f"offset {offset} puts the {b} local rows outside the gathered batch of {B}")
    if ids is not None and tuple(ids.shape) != (b,):
        raise ValueError(f"ids must be [{b}] (one per local anchor), got {tuple(ids.shape)}")
    if ids_all is not None and tuple(ids_all.shape) != (B,):
        raise ValueError(f"ids_all must be [{B}] (one per gathered row), got {tuple(ids_all.shape)}")
    for name, keep in (("keep_i2t", keep_i2t), ("keep_t2i", keep_t2i)):
        if keep is not None and (tuple(keep.shape) != (b, B) or keep.dtype != torch.bool):
            raise ValueError(f"{name} must be a bool [{b}, {B}] mask (True = negative stays), got "
                             f"{tuple(keep.shape)} {keep.dtype}")


def _group(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Group equal ids without a host sync: slot [b] (equal ids share a slot) and slot_ids [b] (id of each slot;
    slots past the number of distinct ids are unused and hold 0)."""
    sorted_ids, order = ids.sort()
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = torch.empty_like(ids).scatter_(0, order, starts.cumsum(0) - 1)
    return slot, torch.zeros_like(ids).scatter_(0, slot, ids)


def _metrics(values: dict[str, Tensor | float]) -> dict[str, Tensor | float]:
    """Logging values, detached: 0-d tensors stay on the device (the caller reads them when it logs, so a step never
    waits for the device for them), python numbers stay numbers."""
    return {k: v.detach().reshape(()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}


class ClipInfoNCE(nn.Module):
    """CLIP's mini-batch InfoNCE, both directions, with keep masks; τ = 1 / logit_scale (the model's, learnable).

    With keep masks None it equals open_clip.loss.ClipLoss (checked against open_clip 3.3.0). No per-sample state.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_logit_scale: Tensor | None = None

    @property
    def temperature(self) -> float:
        """τ of the last call (nan before the first)."""
        return float("nan") if self._last_logit_scale is None else 1.0 / float(self._last_logit_scale)

    def forward(
            self, img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, *, ids: Tensor | None = None,
            ids_all: Tensor | None = None, epoch: int = 0, keep_i2t: Tensor | None = None,
            keep_t2i: Tensor | None = None, offset: int = 0, logit_scale: Tensor | float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """(loss, metrics): mean over local anchors of ½(ℓ_i2t + ℓ_t2i); metrics temperature, kept fractions (0-d
        tensors: no host read)."""
        if logit_scale is None:
            raise ValueError("ClipInfoNCE needs logit_scale (the model's exp'ed logit_scale, = 1/τ)")
        _check_inputs(img, txt, img_all, txt_all, ids, ids_all, keep_i2t, keep_t2i, offset)
        logit_scale = torch.as_tensor(logit_scale, device=img.device)
        self._last_logit_scale = logit_scale.detach()
        logits_i2t = _similarity(img, txt_all, logit_scale)                   # [b, B] rows: local images
        logits_t2i = _similarity(txt, img_all, logit_scale)                   # [b, B] rows: local texts
        loss = (info_nce_rows(logits_i2t, offset, keep_i2t).mean()
                + info_nce_rows(logits_t2i, offset, keep_t2i).mean()) / 2
        values: dict[str, Tensor | float] = {"temperature": 1.0 / self._last_logit_scale}
        values.update(_kept_fractions(keep_i2t, keep_t2i, offset))
        return loss, _metrics(values)

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]:
        """No per-sample state: an empty dict."""
        return {}

    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None:
        """No per-sample state: nothing to write."""


def _kept_fractions(keep_i2t: Tensor | None, keep_t2i: Tensor | None, offset: int) -> dict[str, Tensor]:
    """Fraction of negatives kept per direction (only for the masks given)."""
    out = {}
    for name, keep in (("kept_frac_i2t", keep_i2t), ("kept_frac_t2i", keep_t2i)):
        if keep is not None:
            b, B = keep.shape
            kept = kept_negatives(keep, positive_mask(b, B, offset, keep.device)).sum()
            out[name] = kept / max(b * (B - 1), 1)
    return out


class _GlobalContrastive(nn.Module):
    """Shared SogCLR / FastCLIP machinery: u_img, u_txt moving averages [num_samples] float32 (buffers)."""

    def __init__(self, num_samples: int, gamma_min: float, gamma_decay_epochs: int, eps: float) -> None:
        super().__init__()
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        gamma_schedule(0, gamma_min, gamma_decay_epochs)                  # validates gamma_min
        self.num_samples = num_samples
        self.gamma_min = gamma_min
        self.gamma_decay_epochs = gamma_decay_epochs
        self.eps = eps
        self.register_buffer("u_img", torch.zeros(num_samples, dtype=torch.float32))   # [n] image anchors
        self.register_buffer("u_txt", torch.zeros(num_samples, dtype=torch.float32))   # [n] text anchors

    def _tau(self) -> Tensor | float:
        raise NotImplementedError

    def _inv_tau(self) -> Tensor | float:
        """1/τ as it enters exp((s_ij − s_ii)/τ); subclasses may reshape its gradient."""
        return 1.0 / self._tau()

    def _extra_loss(self) -> Tensor | float:
        return 0.0

    @property
    def temperature(self) -> float:
        """Current τ (float)."""
        tau = self._tau()
        return float(tau.detach()) if isinstance(tau, Tensor) else float(tau)

    def gamma(self, epoch: int) -> float:
        """Inner rate γ at `epoch` (gamma_schedule)."""
        return gamma_schedule(epoch, self.gamma_min, self.gamma_decay_epochs)

    def forward(
            self, img: Tensor, txt: Tensor, img_all: Tensor, txt_all: Tensor, *, ids: Tensor,
            ids_all: Tensor | None = None, epoch: int, keep_i2t: Tensor | None = None,
            keep_t2i: Tensor | None = None, offset: int = 0, logit_scale: Tensor | float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """(loss, metrics as 0-d tensors or floats); updates u_img/u_txt rows of `ids` (detached). `logit_scale` is
        ignored: τ is the loss's."""
        _check_inputs(img, txt, img_all, txt_all, ids, ids_all, keep_i2t, keep_t2i, offset)
        gamma = self.gamma(epoch)
        loss_i2t, u_i2t = self._direction(img, txt_all, self.u_img, ids, keep_i2t, offset, gamma)   # [b], [b]
        loss_t2i, u_t2i = self._direction(txt, img_all, self.u_txt, ids, keep_t2i, offset, gamma)   # [b], [b]
        loss = (loss_i2t.mean() + loss_t2i.mean()) / 2 + self._extra_loss()
        values: dict[str, Tensor | float] = {"temperature": self._tau(), "gamma": gamma,
                                             "u_img_mean": u_i2t.mean(), "u_txt_mean": u_t2i.mean()}
        values.update(_kept_fractions(keep_i2t, keep_t2i, offset))
        return loss, _metrics(values)

    def _direction(
            self, anchors: Tensor, candidates: Tensor, u: Tensor, ids: Tensor, keep: Tensor | None, offset: int,
            gamma: float,
    ) -> tuple[Tensor, Tensor]:
        """Per-anchor loss [b] (value τ·log(ε+u), gradient τ·∇g/(ε+u)) and the anchors' new u [b] for one direction."""
        sim = _similarity(anchors, candidates)                                       # [b, B] cosine
        b, B = sim.shape
        is_pos = positive_mask(b, B, offset, sim.device)                             # [b, B]
        kept = kept_negatives(keep, is_pos)                                          # [b, B]
        n_kept = kept.sum(1)                                                         # [b] K_i
        has_neg = n_kept > 0                                                         # [b]
        s_pos = sim.gather(1, (torch.arange(b, device=sim.device) + offset)[:, None])   # [b, 1] s_ii
        diff = ((sim - s_pos) * self._inv_tau()).masked_fill(~kept, float("-inf"))  # [b, B] (s_ij − s_ii)/τ
        log_k = n_kept.clamp_min(1).to(sim.dtype).log()                              # [b]
        g = (torch.logsumexp(diff.detach(), 1) - log_k).exp()                        # [b] detached; 0 if K_i = 0
        u_rows = self._update_rows(u, ids, g, has_neg, gamma)                       # [b] detached, new u
        log_u = (self.eps + u_rows).log()                                            # [b] detached
        ratio = (diff - log_u[:, None]).exp().sum(1) / n_kept.clamp_min(1)          # [b] g/(ε+u), with grad
        tau = self._tau()
        tau_detached = tau.detach() if isinstance(tau, Tensor) else tau
        loss = tau_detached * (ratio - ratio.detach()) + tau * log_u                 # [b]
        return torch.where(has_neg, loss, torch.zeros_like(loss)), u_rows

    @torch.no_grad()
    def _update_rows(self, u: Tensor, ids: Tensor, g: Tensor, has_neg: Tensor, gamma: float) -> Tensor:
        """One moving-average step per distinct id (mean g of its rows with negatives); writes u, returns rows [b]."""
        ids = ids.to(u.device, torch.long)
        g, has_neg = g.to(u.device), has_neg.to(u.device)
        slot, slot_ids = _group(ids)                                                  # [b], [b]
        weight = has_neg.to(g.dtype)                                                  # [b]
        count = torch.zeros_like(weight).index_add_(0, slot, weight)                  # [b] rows with negatives / slot
        g_mean = torch.zeros_like(g).index_add_(0, slot, g * weight) / count.clamp_min(1)   # [b] per slot
        u_old = u[slot_ids].to(g.dtype)                                               # [b] per slot
        unset = ~(u_old > _UNSET_U) | ~torch.isfinite(u_old)
        u_slot = torch.where(unset, g_mean, (1.0 - gamma) * u_old + gamma * g_mean).clamp(max=_F32_MAX)
        rows = torch.where(count[slot] > 0, u_slot[slot], u[ids].to(g.dtype))       # [b] equal for equal ids
        u[ids] = rows.to(u.dtype)
        return rows

    def export_rows(self, ids: Tensor) -> dict[str, Tensor]:
        """Copies of the u_img / u_txt rows of `ids` (for distributed.sync_rows)."""
        ids = ids.to(self.u_img.device, torch.long)
        return {"u_img": self.u_img[ids], "u_txt": self.u_txt[ids]}

    @torch.no_grad()
    def import_rows(self, ids: Tensor, rows: dict[str, Tensor]) -> None:
        """Write `export_rows` output back; for a repeated id the first occurrence wins."""
        ids = ids.to(self.u_img.device, torch.long)
        for key in ("u_img", "u_txt"):
            if key not in rows or tuple(rows[key].shape) != tuple(ids.shape):
                got = tuple(rows[key].shape) if key in rows else "missing"
                raise ValueError(f"import_rows: rows[{key!r}] must have shape {tuple(ids.shape)}, got {got}")
        slot, _ = _group(ids)
        position = torch.arange(len(ids), device=ids.device)
        first = torch.zeros_like(ids).scatter_reduce_(0, slot, position, "amin", include_self=False)[slot]
        for key in ("u_img", "u_txt"):
            state = getattr(self, key)
            state[ids] = rows[key].to(state.device, state.dtype)[first]


class SogCLRLoss(_GlobalContrastive):
    """SogCLR / FastCLIP-v1: global contrastive loss with per-sample moving averages u and a constant τ.

    Defaults follow the GloFND CC3M v1 recipe (τ = 0.03, γ cosine from 1 to 0.2 over 18 epochs). See the module
    docstring for the exact estimator.
    """

    def __init__(self, num_samples: int, tau: float = 0.03, gamma_min: float = 0.2, gamma_decay_epochs: int = 18,
                 eps: float = 1e-14) -> None:
        super().__init__(num_samples, gamma_min, gamma_decay_epochs, eps)
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = float(tau)

    def _tau(self) -> float:
        return self.tau


class FastCLIPLoss(_GlobalContrastive):
    """FastCLIP-v3: SogCLR's loss with one global learnable τ and the ρ·τ term (RGCL-g, Wei et al. 2024).

    τ = exp(−log_inv_tau) (open_clip's logit_scale parametrisation); call `clamp_tau_()` after every optimizer step
    to keep τ in [tau_min, tau_max], as FastCLIP clamps logit_scale to [0, ln 100]. `tau_grad` picks the τ-gradient
    estimator ("fastclip": the reference code's; "objective": the gradient of the stated objective); see the module
    docstring. Defaults: the GloFND CC3M v3 recipe (τ₀ = 0.07, ρ = 6.5, γ cosine to 0.2 over 18 epochs).
    """

    def __init__(self, num_samples: int, tau_init: float = 0.07, rho: float = 6.5, gamma_min: float = 0.2,
                 gamma_decay_epochs: int = 18, eps: float = 1e-14, tau_min: float = 0.01, tau_max: float = 1.0,
                 tau_grad: str = "fastclip") -> None:
        super().__init__(num_samples, gamma_min, gamma_decay_epochs, eps)
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"need 0 < tau_min ({tau_min}) <= tau_init ({tau_init}) <= tau_max ({tau_max})")
        if tau_grad not in ("fastclip", "objective"):
            raise ValueError(f"tau_grad must be 'fastclip' or 'objective', got {tau_grad!r}")
        self.rho = float(rho)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.tau_grad = tau_grad
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / tau_init), dtype=torch.float32))

    def _tau(self) -> Tensor:
        return torch.exp(-self.log_inv_tau)

    def _inv_tau(self) -> Tensor:
        inv_tau = torch.exp(self.log_inv_tau)
        if self.tau_grad == "fastclip":                  # same value, twice the τ-path through g (see module doc)
            inv_tau = 2 * inv_tau - inv_tau.detach()
        return inv_tau

    def _extra_loss(self) -> Tensor:
        return self.rho * self._tau()

    @torch.no_grad()
    def clamp_tau_(self) -> None:
        """Project τ back into [tau_min, tau_max] (call after each optimizer step)."""
        self.log_inv_tau.clamp_(math.log(1.0 / self.tau_max), math.log(1.0 / self.tau_min))


_CLASSES: dict[str, type[nn.Module]] = {"clip": ClipInfoNCE, "sogclr": SogCLRLoss, "fastclip": FastCLIPLoss}


def _accepted(cls: type[nn.Module]) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "num_samples")}


def create_loss(name: str, num_samples: int, **kwargs: object) -> nn.Module:
    """Loss by name ("clip", "sogclr" = "fastclip-v1", "fastclip" = "fastclip-v3").

    `kwargs` may hold the options of any of the losses (one shared config); those the chosen loss does not take are
    ignored, names no loss takes raise. Example: create_loss("fastclip", n, tau_init=0.07, rho=6.5, gamma_min=0.2).
    """
    key = _ALIASES.get(name, name)
    if key not in _CLASSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)} (--loss-name)")
    known = set().union(*(_accepted(cls) for cls in _CLASSES.values()))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown}; known: {sorted(known)}")
    cls = _CLASSES[key]
    options = {k: v for k, v in kwargs.items() if k in _accepted(cls)}
    return cls(**options) if cls is ClipInfoNCE else cls(num_samples, **options)
