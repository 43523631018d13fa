"""Per-sample preference losses for text-to-image diffusion models.

Every loss takes per-sample denoising errors of shape ``(B,)`` (one entry per preference pair),
``e = mean over (C, H, W) of (pred - target)^2``, computed by the trainer for the preferred (w) and the
rejected (l) sample of each pair under the same noise and timestep, and returns a :class:`LossOutput` whose
``losses`` the trainer reduces with ``.mean()``.

Conventions shared by all losses:

* ``err_*`` are policy errors (carry gradients); ``ref_err_*`` are reference errors and are detached here,
  so a reference can never be trained by accident.
* ``timestep_weight`` is the per-pair weight ``lambda(t)`` of the implicit reward, shape ``(B,)`` (see
  :func:`prefopt_core.timesteps.timestep_weight_table`); ``None`` means 1. Losses that have no implicit reward
  (MaPO, SFT) ignore it.
* ``implicit_acc`` counts a tie (zero margin) as *wrong*, as the official Diffusion-DPO code does with
  ``inside_term > 0``; diffusers' research script counts a tie as 1/2. At step 0, with policy == reference,
  every DPO margin is exactly 0 so ``implicit_acc`` starts at 0, not 0.5.
* All metrics are detached scalar tensors, already averaged over the batch.

Usage::

    from prefopt_core.losses import compute_loss, loss_kwargs

    params = loss_kwargs(cfg.loss, adapter.schedule)          # e.g. {"beta": 5000.0, "convention": "official"}
    out = compute_loss("dpo", err_w, err_l, ref_err_w, ref_err_l, **params)
    out.losses.mean().backward()
    log({"loss": out.losses.mean(), **out.metrics})
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from prefopt_core.timesteps import NoiseSchedule

logger = logging.getLogger(__name__)

LossName = Literal["dpo", "mapo", "sft", "kto"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)

DpoConvention = Literal["official", "diffusers"]
DPO_CONVENTIONS: tuple[str, ...] = get_args(DpoConvention)
DEFAULT_DPO_CONVENTION: DpoConvention = "official"

# Factor in front of beta in the DPO logit: the official code has -0.5 * beta, diffusers' script -beta.
_DPO_BETA_FACTOR: dict[str, float] = {"official": 0.5, "diffusers": 1.0}

# Below this |c * e| the MaPO score uses its Taylor series (the closed form is 0/0 at 0).
_MAPO_TAYLOR_BELOW = 1e-3

#: The beta a run uses when ``loss.beta`` is not set, per loss, each from its paper's official code:
DEFAULT_BETA: dict[str, float] = {
    # SalesforceAIResearch/DiffusionDPO SDXL/SD1.5 launchers, --beta_dpo 5000 (official convention, 0.5 factor;
    # == 2500 in the diffusers convention).
    "dpo": 5000.0,
    # mapo-t2i/mapo train.py, --beta_mapo default 0.1.
    "mapo": 0.1,
    # jacklishufan/diffusion-kto train_kto_sd_v1.5.py, --beta_dpo default 1000; its published launcher
    # (exps/example.sh) does not override it. It multiplies the log-likelihood gain with no 0.5 factor.
    "kto": 1000.0,
    # Chosen-only baseline: no preference term.
    "sft": 0.0,
}


@dataclass(frozen=True, eq=False)
class LossOutput:
    """What every loss returns.

    ``losses``: ``(B,)`` per-pair loss; the trainer takes ``.mean()``.
    ``metrics``: detached scalar tensors, already averaged over the batch.
    ``per_sample``: detached ``(B,)`` tensors for per-timestep-bin metrics; losses with an implicit reward
    (dpo, kto) set ``"reward_margin"`` (the per-pair value whose mean is ``metrics["reward_margin"]``).
    """

    losses: Tensor
    metrics: dict[str, Tensor]
    per_sample: dict[str, Tensor] = field(default_factory=dict)


def _check_errors(**tensors: Tensor | None) -> None:
    """Raise ``ValueError`` unless every given tensor is 1-D and all share one shape ``(B,)``."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"{name} must have shape (B,), got {shape}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-sample errors must share one shape (B,), got {shapes}")


def _weight(timestep_weight: Tensor | None, like: Tensor) -> Tensor | float:
    """``lambda(t)`` as a ``(B,)`` tensor on ``like``'s device and dtype, or the float 1.0 when absent."""
    if timestep_weight is None:
        return 1.0
    _check_errors(err=like, timestep_weight=timestep_weight)
    return timestep_weight.detach().to(device=like.device, dtype=like.dtype)


def _mean(x: Tensor) -> Tensor:
    return x.detach().float().mean()


def diffusion_dpo(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float,
    timestep_weight: Tensor | None = None,
    convention: DpoConvention = DEFAULT_DPO_CONVENTION,
) -> LossOutput:
    """Diffusion-DPO loss, per pair.

    Paper: Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
    arXiv:2311.12908, Eq. 14 (the ``T * omega(lambda_t)`` factor is folded into ``beta`` and the optional
    timestep weight ``lambda``). Matches the official SalesforceAIResearch/DiffusionDPO ``train.py``::

        inside = -c * beta * lambda * ((e_w - e_ref_w) - (e_l - e_ref_l))      (Eq. 14)
        loss   = -log sigmoid(inside)

    beta convention: ``convention="official"`` uses ``c = 0.5`` (official code, ``scale_term = -0.5 *
    beta_dpo``; defaults 5000 for SDXL, 2000-5000 for SD1.5). ``convention="diffusers"`` uses ``c = 1``, the
    form of diffusers' ``examples/research_projects/diffusion_dpo`` scripts
    (``-logsigmoid(beta_dpo * (ref_diff - model_diff))``, default 2500), so diffusers' beta 2500 equals
    official beta 5000 exactly.

    Shapes: all errors and ``timestep_weight`` are ``(B,)``; returns ``losses`` ``(B,)``.
    Metrics: ``implicit_acc`` = mean(inside > 0) (ties count as wrong, as in the official code),
    ``reward_margin`` = mean(inside), ``dpo/model_diff`` = mean(e_w - e_l), ``dpo/ref_diff`` =
    mean(e_ref_w - e_ref_l).
    When policy == reference, ``inside`` is 0 and the loss is ln 2 for every pair.
    """
    if convention not in _DPO_BETA_FACTOR:
        raise ValueError(f"unknown DPO convention {convention!r}; valid options: {list(DPO_CONVENTIONS)}")
    _check_errors(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    lam = _weight(timestep_weight, err_w)
    model_diff = err_w - err_l  # (B,)
    ref_diff = ref_err_w.detach() - ref_err_l.detach()  # (B,)
    # One Python float so that official(beta) and diffusers(beta / 2) give bit-identical results.
    coef = -_DPO_BETA_FACTOR[convention] * float(beta)
    inside = coef * lam * (model_diff - ref_diff)  # (Eq. 14)
    losses = -F.logsigmoid(inside)  # (Eq. 14)
    metrics = {
        "implicit_acc": _mean(inside > 0),
        "reward_margin": _mean(inside),
        "dpo/model_diff": _mean(model_diff),
        "dpo/ref_diff": _mean(ref_diff),
    }
    return LossOutput(losses=losses, metrics=metrics, per_sample={"reward_margin": inside.detach()})


def mapo_score(err: Tensor, snr_value: float) -> Tensor:
    """MaPO's bounded score ``s(e) = c*e / (exp(c*e) - 1)`` with ``c = snr_value``, elementwise.

    Computed without overflow or 0/0: with ``x = c*e`` and ``a = |x|``,
    ``s(x) = a*exp(-a) / (1 - exp(-a)) + max(-x, 0)`` (the identity ``s(-a) = s(a) + a``), and for
    ``|x| < 1e-3`` the Taylor series ``1 - x/2 + x^2/12`` (error < 1e-15), so ``s(0) = 1`` and
    ``s'(0) = -c/2`` exactly; values and gradients stay finite for ``e`` up to float max.
    """
    x = snr_value * err
    small = x.abs() < _MAPO_TAYLOR_BELOW
    a = torch.where(small, torch.ones_like(x), x.abs())  # safe input: no 0/0 even in the unused branch
    closed = a * torch.exp(-a) / -torch.expm1(-a) + torch.relu(-x)
    taylor = 1.0 - x / 2.0 + x * x / 12.0
    return torch.where(small, taylor, closed)


def mapo(
    err_w: Tensor,
    err_l: Tensor,
    *,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO (margin-aware preference optimisation) loss, per pair; no reference model.

    Paper: Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without
    Reference", arXiv:2406.06424. The equations below follow the official mapo-t2i/mapo ``train.py``
    (``log_odds``/``ratio``/``loss``); they are numbered (M1)-(M3) here because the paper's numbering differs
    between its arXiv and AAAI versions::

        s(e)  = c*e / (exp(c*e) - 1),  c = snr_value (0.5)                        (Eq. M1)
        ratio = log sigmoid(T * (s(e_w) - s(e_l))),  T = num_train_timesteps      (Eq. M2)
        loss  = e_w - beta * ratio                                                (Eq. M3)

    The official code applies ``s`` to the per-sample errors (mean over C, H, W first) and its scalar loss
    ``mean(e_w) - mean(beta * ratio)`` equals the batch mean of (M3). ``s`` is computed stably
    (:func:`mapo_score`), which the official code does not do (it gives NaN at e = 0 and for large e).

    beta convention: ``beta`` weighs the margin term against the chosen-sample MSE (official
    ``--beta_mapo``, default 0.1). When ``e_w == e_l`` the loss is ``e_w + beta * ln 2``.

    Shapes: ``err_w``, ``err_l`` ``(B,)``; returns ``losses`` ``(B,)``.
    Metrics: ``implicit_acc`` = mean(s(e_w) > s(e_l)) (ties wrong), ``reward_margin`` =
    mean(T * (s(e_w) - s(e_l))), ``mapo/sft_loss`` = mean(e_w), ``mapo/ratio_loss`` = mean(-beta * ratio)
    (so loss = sft_loss + ratio_loss), ``mapo/score_w``, ``mapo/score_l``.
    """
    if snr_value <= 0:
        raise ValueError(f"snr_value must be > 0, got {snr_value}")
    _check_errors(err_w=err_w, err_l=err_l)
    score_w = mapo_score(err_w, snr_value)  # (Eq. M1)  (B,)
    score_l = mapo_score(err_l, snr_value)  # (Eq. M1)  (B,)
    margin = num_train_timesteps * (score_w - score_l)  # (B,)
    ratio = F.logsigmoid(margin)  # (Eq. M2)
    losses = err_w - beta * ratio  # (Eq. M3)
    metrics = {
        "implicit_acc": _mean(score_w > score_l),
        "reward_margin": _mean(margin),
        "mapo/sft_loss": _mean(err_w),
        "mapo/ratio_loss": _mean(-beta * ratio),
        "mapo/score_w": _mean(score_w),
        "mapo/score_l": _mean(score_l),
    }
    return LossOutput(losses=losses, metrics=metrics)


def sft(err_w: Tensor) -> LossOutput:
    """Chosen-only supervised fine-tuning baseline: ``loss = e_w`` per pair.

    The standard denoising loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Eq. 14,
    simple loss) on the preferred sample only, as in the official Diffusion-DPO ``--train_method sft``.
    No beta, no reference, no rejected sample. Shapes: ``err_w`` ``(B,)``; returns ``losses`` ``(B,)``.
    Metrics: ``sft/mse_w`` = mean(e_w). It reports no ``implicit_acc``/``reward_margin``.
    """
    _check_errors(err_w=err_w)
    losses = err_w  # (Eq. 14)
    return LossOutput(losses=losses, metrics={"sft/mse_w": _mean(err_w)})


def kto(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    timestep_weight: Tensor | None = None,
) -> LossOutput:
    """Diffusion-KTO loss on a batch of pairs, per pair.

    Paper: Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility", arXiv:2404.04465.
    Matches the official jacklishufan/diffusion-kto ``train_kto_sd_v1.5.py`` with ``--halo sigmoid
    --loss kto``, each pair split into one desirable sample (w) and one undesirable sample (l)::

        g      = lambda * (e_ref - e)                    per sample; log p_theta - log p_ref  (Eq. K1)
        z0     = stopgrad(max(0, mean of g over all 2B samples))                             (Eq. K2)
        loss_w = w_D * (1 - sigmoid(beta * (g_w - z0)))                                       (Eq. K3)
        loss_l = w_U * (1 - sigmoid(beta * (z0 - g_l)))                                       (Eq. K3)
        loss   = (loss_w + loss_l) / 2                   per pair, so mean == official mean over samples

    (K2)-(K3) are the official code's ``g_term - kl`` step, which it labels "eq 8"; (K1)-(K3) number the
    code here. Note the reference point is the clamped batch mean of ``e_ref - e`` (policy log-likelihood
    gain), i.e. ``-(e - e_ref)``. The implicit reward is ``r = beta * g``.

    beta convention: beta multiplies ``g - z0`` with no 0.5 factor (official ``--beta_dpo``, default 1000).
    ``desirable_weight``/``undesirable_weight`` are the official ``--lambda_d_kto``/``--lambda_u_kto``.

    Deviations from the official code (documented, deliberate):
    * The official code trains on unpaired samples; here the desirable/undesirable halves come from pairs.
    * The official code averages ``z0`` over all processes (``accelerator.reduce``); here ``z0`` is the
      mean over the local batch only.
    * ``lambda`` (``timestep_weight``) does not exist in the official code; it scales ``g`` before ``z0`` is
      taken, so ``lambda = 1`` reproduces the official loss.

    Shapes: all errors and ``timestep_weight`` ``(B,)``; returns ``losses`` ``(B,)``.
    Metrics: ``implicit_acc`` = mean(r_w > r_l) over pairs (comparable with DPO), ``reward_margin`` =
    mean(r_w - r_l), ``kto/acc`` = the official per-sample accuracy (share of samples on the right side of
    ``z0``), ``kto/kl`` = z0, ``kto/reward_w``, ``kto/reward_l``.
    """
    _check_errors(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    lam = _weight(timestep_weight, err_w)
    g_w = lam * (ref_err_w.detach() - err_w)  # (Eq. K1)  (B,)
    g_l = lam * (ref_err_l.detach() - err_l)  # (Eq. K1)  (B,)
    z0 = torch.cat([g_w, g_l]).mean().clamp(min=0).detach()  # (Eq. K2)  scalar
    logit_w = beta * (g_w - z0)  # (B,)
    logit_l = beta * (z0 - g_l)  # (B,)
    loss_w = desirable_weight * (1 - torch.sigmoid(logit_w))  # (Eq. K3)
    loss_l = undesirable_weight * (1 - torch.sigmoid(logit_l))  # (Eq. K3)
    losses = 0.5 * (loss_w + loss_l)
    reward_w, reward_l = beta * g_w, beta * g_l
    metrics = {
        "implicit_acc": _mean(reward_w > reward_l),
        "reward_margin": _mean(reward_w - reward_l),
        "kto/acc": _mean(torch.cat([logit_w, logit_l]) > 0),
        "kto/kl": z0.float(),
        "kto/reward_w": _mean(reward_w),
        "kto/reward_l": _mean(reward_l),
    }
    return LossOutput(
        losses=losses, metrics=metrics, per_sample={"reward_margin": (reward_w - reward_l).detach()}
    )


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what it needs from the trainer.

    ``params``: the keyword parameters (besides ``timestep_weight``) the function accepts.
    ``needs_reference``: compares the policy with reference errors (the one owner of that fact; the config
    and the reference strategies ask :func:`get_loss`).
    ``uses_timestep_weight``: has an implicit reward that ``lambda(t)`` can scale.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    uses_rejected: bool
    uses_timestep_weight: bool
    params: frozenset[str]

    def check_timestep_weight(self, weight: str) -> None:
        """``ValueError`` when a timestep weight other than ``"none"`` is asked of a loss without an implicit reward."""
        if weight != "none" and not self.uses_timestep_weight:
            users = sorted(n for n, s in LOSSES.items() if s.uses_timestep_weight)
            raise ValueError(
                f"loss.timestep_weight={weight} scales the implicit reward of {'/'.join(users)}; "
                f"loss.name={self.name} has none, so use loss.timestep_weight=none."
            )


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        name="dpo",
        fn=diffusion_dpo,
        needs_reference=True,
        uses_rejected=True,
        uses_timestep_weight=True,
        params=frozenset({"beta", "convention"}),
    ),
    "mapo": LossSpec(
        name="mapo",
        fn=mapo,
        needs_reference=False,
        uses_rejected=True,
        uses_timestep_weight=False,
        params=frozenset({"beta", "snr_value", "num_train_timesteps"}),
    ),
    "sft": LossSpec(
        name="sft",
        fn=sft,
        needs_reference=False,
        uses_rejected=False,
        uses_timestep_weight=False,
        params=frozenset(),
    ),
    "kto": LossSpec(
        name="kto",
        fn=kto,
        needs_reference=True,
        uses_rejected=True,
        uses_timestep_weight=True,
        params=frozenset({"beta", "desirable_weight", "undesirable_weight"}),
    ),
}


def get_loss(name: str) -> LossSpec:
    """The registered :class:`LossSpec` for ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}") from None


def resolved_beta(name: str, beta: float | None) -> float:
    """``beta`` if set, else the loss's :data:`DEFAULT_BETA`."""
    get_loss(name)
    return DEFAULT_BETA[name] if beta is None else float(beta)


def loss_kwargs(section: Any, schedule: NoiseSchedule) -> dict[str, Any]:
    """The keyword arguments of loss ``section.name``'s function, from a loss config and the model's schedule.

    ``section`` is a :class:`prefopt_core.config.LossSection` (or any object with its fields). Only the
    parameters the loss accepts are returned: ``beta`` resolved by :func:`resolved_beta`,
    ``num_train_timesteps`` (MaPO's ``T``) from ``schedule``, every other one read from the section under its
    own name. E.g. a default dpo section -> ``{"beta": 5000.0, "convention": "official"}``.
    """
    spec = get_loss(section.name)
    out: dict[str, Any] = {}
    for param in sorted(spec.params):
        if param == "beta":
            out[param] = resolved_beta(spec.name, section.beta)
        elif param == "num_train_timesteps":
            out[param] = schedule.num_train_timesteps
        else:
            out[param] = getattr(section, param)
    return out


def compute_loss(
    name: str,
    err_w: Tensor,
    err_l: Tensor | None = None,
    ref_err_w: Tensor | None = None,
    ref_err_l: Tensor | None = None,
    *,
    timestep_weight: Tensor | None = None,
    **params: object,
) -> LossOutput:
    """Dispatch to the loss ``name`` with one signature for all losses.

    ``params`` are the loss's own parameters (:func:`loss_kwargs` makes them from a config); one the loss
    does not accept raises ``ValueError`` listing those it does; a missing ``beta`` is :data:`DEFAULT_BETA`.
    ``timestep_weight`` ``(B,)`` is ignored by losses without an implicit reward (``mapo``, ``sft``).
    Reference-based losses (``dpo``, ``kto``) raise ``ValueError`` without ``ref_err_w``/``ref_err_l``;
    losses that use the rejected sample raise without ``err_l``.
    """
    spec = get_loss(name)
    unknown = sorted(set(params) - spec.params)
    if unknown:
        raise ValueError(
            f"loss {name!r} does not take parameter(s) {unknown}; its parameters: {sorted(spec.params)}"
        )
    kwargs = dict(params)
    if "beta" in spec.params and "beta" not in kwargs:
        kwargs["beta"] = DEFAULT_BETA[name]
    if spec.uses_rejected and err_l is None:
        raise ValueError(f"loss {name!r} needs err_l (the rejected sample's errors)")
    if spec.needs_reference and (ref_err_w is None or ref_err_l is None):
        raise ValueError(
            f"loss {name!r} needs reference errors ref_err_w and ref_err_l; "
            f"reference-free losses: {sorted(n for n, s in LOSSES.items() if not s.needs_reference)}"
        )
    if spec.uses_timestep_weight:
        kwargs["timestep_weight"] = timestep_weight
    elif timestep_weight is not None:
        logger.debug("loss %r ignores timestep_weight", name)
    if not spec.uses_rejected:
        return spec.fn(err_w, **kwargs)
    if not spec.needs_reference:
        return spec.fn(err_w, err_l, **kwargs)
    return spec.fn(err_w, err_l, ref_err_w, ref_err_l, **kwargs)
