"""Reference-model strategies for reference-based preference losses (Diffusion-DPO, Diffusion-KTO).

``reference.strategy`` (:data:`ReferenceStrategy`; which losses need which strategies: :func:`check_strategy`):

* ``frozen``: the reference is a frozen copy of the initial policy and never changes (Diffusion-DPO).
* ``periodic``: Rethinking DPO's stable reference update (Kang et al. 2025, arXiv:2505.18736). Every
  ``tau`` **optimizer** steps the policy weights are hard-copied into the reference *if* the divergence
  of the policy from the pretrained model, measured on a fixed probe set, is ``D <= delta``. The first time
  ``D > delta`` the reference stops moving for good (``frozen`` is set and never cleared):
  ``on_exceed="freeze"`` keeps the reference at its last copy; ``on_exceed="reinit"`` resets it to the
  pretrained weights (and it then stays there: the policy cannot come back within ``delta`` by itself, and
  "reinit" means falling back to the plain frozen-pretrained Diffusion-DPO anchor). A NaN ``D`` counts as
  exceeded.
* ``precomputed`` / ``none``: no live reference model (:attr:`ReferenceManager.reference` is ``None``);
  precomputed reference errors come from the latent cache.

**The divergence D.** Each probe sample ``p`` is a preferred latent with a fixed noise and timestep;
``e_model[p]`` is the model's denoising error on it (``errors_fn``). Diffusion-DPO (Wallace et al. 2023,
arXiv:2311.12908, the derivation of its Eq. 14) writes each error as a per-timestep KL between the forward
posterior ``q(x_{t-1}|x_t, x_0)`` and the model's Gaussian reverse step, up to a positive weight ``w_t``;
so ``e_model - e_init`` is a difference of per-timestep KLs, i.e. an estimate of
``log p_init(x) - log p_model(x)`` (the quantity the DPO loss compares with the reference). Its mean over data is *signed*: it is negative when the model fits the probe
better than the pretrained model. D uses the per-sample absolute value::

    D(model || init) = mean_p | e_model[p] - e_init[p] |                  (prefopt_core.metrics.error_divergence)

because the paper's regularisation bounds how far the reference drifts from the pretrained model in either
direction: with the signed mean a policy that drifts far while fitting the probe better would never trip
the monitor (and ``delta = 0`` would not stop anything), and signed per-sample shifts could cancel. With
``|.|``, ``D = 0`` iff the errors on every probe sample are unchanged, and ``D > 0`` as soon as the policy
has trained. The update rule is ``update iff D <= delta``; hence ``delta = 0`` never moves the reference for a
policy whose probe errors changed (at the first check ``D > 0`` freezes it at the pretrained weights), and
``delta = inf`` updates at every check (``steps // tau`` updates). D is in error (MSE) units and depends on
the model and the probe: pick ``delta`` from the ``kl/policy_init`` curve of a run (logged at every check
and eval). The signed shift is logged too, as ``kl/*_signed``.

The pretrained model's probe errors ``e_init`` are computed **once**, by :meth:`ReferenceManager.initialize`
from the policy at step 0, and cached: no third model copy is kept. Metrics (MLflow names):
``kl/policy_init`` (= D), ``kl/ref_init``, ``kl/policy_ref`` (each with ``_signed``), ``ref/updates``,
``ref/frozen``.

Distributed use: every rank must call :meth:`ReferenceManager.initialize`, :meth:`~ReferenceManager.on_optimizer_step`
and :meth:`~ReferenceManager.measure` (under ZeRO-3 both the probe forward and the weight copy are
collectives). Measured errors are broadcast from rank 0 (``sync_fn``), so every rank takes the same
decision even if forward passes differ in the last bit.

Usage::

    probe = build_probe(latents_w, cond, size=8, num_train_timesteps=1000, seed=0)   # prefopt_core.probe
    manager = ReferenceManager("periodic", loss_name="dpo", reference=ref, probe=probe, errors_fn=fn,
                               tau=32, delta=0.05, on_exceed="freeze", device=device)
    manager.initialize(policy)                          # or manager.load_state_dict(saved) on resume
    for step in range(1, max_steps + 1):
        ...optimizer step...
        log(manager.on_optimizer_step(step, policy))    # copies / freezes; {"ref/updates": ..., ...}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prefopt_core.losses import LOSSES, get_loss
from prefopt_core.metrics import divergence_metrics, error_divergence
from prefopt_core.probe import ErrorsFn, Probe, probe_errors
from prefopt_core.weights import full_state_dict, load_full_state_dict, plain_copy, unwrap

logger = logging.getLogger(__name__)

ReferenceStrategy = Literal["frozen", "periodic", "precomputed", "none"]
STRATEGIES: tuple[str, ...] = get_args(ReferenceStrategy)
#: Strategies that hold a live reference model.
LIVE_STRATEGIES: frozenset[str] = frozenset({"frozen", "periodic"})
OnExceed = Literal["freeze", "reinit"]
ON_EXCEED: tuple[str, ...] = get_args(OnExceed)

#: ``copy_fn(src, dst)``: copy ``src``'s weights into ``dst`` in place.
CopyFn = Callable[[nn.Module, nn.Module], None]
#: ``sync_fn(x) -> x``: make a tensor identical on every rank (default: broadcast from rank 0).
SyncFn = Callable[[Tensor], Tensor]

_STATE_FORMAT = 1


def check_strategy(loss_name: str, strategy: str) -> None:
    """``ValueError`` (one sentence) unless ``strategy`` suits loss ``loss_name``: losses that compare the policy
    with a reference (``LossSpec.needs_reference``) need a strategy other than ``none``; reference-free ones
    need ``none`` (a reference would cost memory and never be used)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reference strategy {strategy!r}; valid strategies: {list(STRATEGIES)}")
    if get_loss(loss_name).needs_reference and strategy == "none":
        raise ValueError(
            f"loss.name={loss_name} compares the policy with a reference model, so reference.strategy cannot "
            f"be 'none'; use one of {[s for s in STRATEGIES if s != 'none']}."
        )
    if not get_loss(loss_name).needs_reference and strategy != "none":
        raise ValueError(
            f"loss.name={loss_name} is reference-free, so reference.strategy must be 'none' (got {strategy!r}): "
            f"a reference would cost memory and never be used (reference-based losses: "
            f"{sorted(n for n, s in LOSSES.items() if s.needs_reference)})."
        )


def broadcast_from_rank0(x: Tensor) -> Tensor:
    """``x`` as rank 0 has it, on every rank (identity outside ``torch.distributed`` or with one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    y = x.detach().to(device).contiguous()
    dist.broadcast(y, src=0)
    return y.to(x.device)


# ------------------------------------------------------------------------------------------------ manager
class ReferenceManager:
    """Holds the live reference (or ``None``), the probe set, the cached ``e_init`` and the update counters.

    Args:
        strategy: ``frozen | periodic | precomputed | none``.
        loss_name: the preference loss; reference-based losses (dpo, kto) need a reference strategy other
            than ``none``, reference-free ones (mapo, sft) need ``none``.
        reference: the reference module (``frozen``/``periodic``; ``None`` otherwise), already on its device and
            dtype (under ZeRO-3 the module of an inference-only DeepSpeed engine). It is set to eval mode with
            gradients off; the manager writes into it in place.
        probe, errors_fn: the probe set and ``errors_fn(module, probe) -> (P,)``. Required by ``periodic``;
            optional otherwise (without them :meth:`measure` returns no ``kl/*`` metrics).
        tau, delta, on_exceed: ``periodic`` schedule (see module docstring).
        pretrained_fn: returns a module holding the pretrained weights (e.g. ``adapter.load_denoiser``); called
            once, at a ``reinit``. Required by ``on_exceed="reinit"``.
        copy_fn: ``copy_fn(src, dst)`` in-place weight copy; :func:`~prefopt_core.weights.plain_copy` by default,
            :func:`~prefopt_core.weights.zero3_copy`
            under ZeRO-3.
        chunk_size: probe samples per forward pass.
        device: where the probe tensors live (the models' device).
        sync_fn: makes measured errors identical on all ranks; ``None`` disables.
    """

    def __init__(
        self,
        strategy: ReferenceStrategy,
        *,
        loss_name: str,
        reference: nn.Module | None = None,
        probe: Probe | None = None,
        errors_fn: ErrorsFn | None = None,
        tau: int = 32,
        delta: float = math.inf,
        on_exceed: OnExceed = "freeze",
        pretrained_fn: Callable[[], nn.Module] | None = None,
        copy_fn: CopyFn = plain_copy,
        chunk_size: int = 8,
        device: torch.device | str = "cpu",
        sync_fn: SyncFn | None = broadcast_from_rank0,
    ) -> None:
        check_strategy(loss_name, strategy)
        if on_exceed not in ON_EXCEED:
            raise ValueError(f"unknown on_exceed {on_exceed!r}; valid options: {list(ON_EXCEED)}")
        if strategy in LIVE_STRATEGIES and reference is None:
            raise ValueError(
                f"reference strategy {strategy!r} needs the reference module (e.g. adapter.load_denoiser())"
            )
        if strategy not in LIVE_STRATEGIES and reference is not None:
            raise ValueError(f"reference strategy {strategy!r} holds no live reference; pass reference=None")
        if (probe is None) != (errors_fn is None):
            raise ValueError("pass probe and errors_fn together (or neither)")
        if strategy == "periodic":
            if probe is None:
                raise ValueError(
                    "reference strategy 'periodic' needs a probe set and errors_fn to estimate D"
                )
            if tau < 1:
                raise ValueError(f"tau must be >= 1 optimizer step, got {tau}")
            if math.isnan(delta) or delta < 0:
                raise ValueError(f"delta must be >= 0 (math.inf: always update), got {delta}")
            if on_exceed == "reinit" and pretrained_fn is None:
                raise ValueError(
                    "on_exceed='reinit' needs pretrained_fn (a loader of the pretrained weights)"
                )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.strategy: ReferenceStrategy = strategy
        self.tau, self.delta, self.on_exceed = int(tau), float(delta), on_exceed
        self._reference = reference
        if reference is not None:
            unwrap(reference).requires_grad_(False).eval()
        self.device = torch.device(device)
        self.probe = probe.to(self.device) if probe is not None else None
        self.errors_fn = errors_fn
        self.pretrained_fn = pretrained_fn
        self.copy_fn = copy_fn
        self.chunk_size = int(chunk_size)
        self.sync_fn = sync_fn
        # -- state (state_dict) --
        self.e_init: Tensor | None = None  # (P,) pretrained errors on the probe, computed once
        self.e_ref: Tensor | None = None  # (P,) reference errors, recomputed when the reference changes
        self.updates = 0  # hard copies policy -> reference done
        self.frozen = strategy == "frozen"  # the reference will never move again
        self.frozen_at_step: int | None = None  # periodic: the check at which D first exceeded delta
        self.last_step = 0  # last optimizer step seen by on_optimizer_step
        self.last_divergence: float | None = None  # D at the last periodic check
        self.reference_is_pretrained = reference is not None  # reference weights == pretrained weights
        self._started = False

    @classmethod
    def from_config(cls, section: Any, *, loss_name: str, **kwargs: Any) -> ReferenceManager:
        """From the ``reference`` config section (:class:`prefopt_core.config.ReferenceSection`); ``kwargs``
        are the non-config arguments of ``__init__``."""
        return cls(
            section.strategy,
            loss_name=loss_name,
            tau=section.tau,
            delta=section.delta,
            on_exceed=section.on_exceed,
            **kwargs,
        )

    @property
    def reference(self) -> nn.Module | None:
        """The live reference module, or ``None`` (``precomputed``/``none``)."""
        return self._reference

    # ------------------------------------------------------------------ measuring
    def _errors(self, model: nn.Module) -> Tensor:
        assert self.probe is not None and self.errors_fn is not None
        err = probe_errors(model, self.probe, self.errors_fn, chunk_size=self.chunk_size)  # (P,)
        return self.sync_fn(err) if self.sync_fn is not None else err

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError(
                "ReferenceManager is not started: call initialize(policy) on a fresh run, or "
                "load_state_dict(saved) when resuming"
            )

    def _kl_metrics(self, e_policy: Tensor | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if e_policy is not None and self.e_init is not None:
            out.update(divergence_metrics("policy_init", e_policy, self.e_init))
        if self.e_ref is not None and self.e_init is not None:
            out.update(divergence_metrics("ref_init", self.e_ref, self.e_init))
        if e_policy is not None and self.e_ref is not None:
            out.update(divergence_metrics("policy_ref", e_policy, self.e_ref))
        return out

    def _ref_metrics(self) -> dict[str, float]:
        if self.strategy != "periodic":
            return {}
        return {"ref/updates": float(self.updates), "ref/frozen": float(self.frozen)}

    def initialize(self, policy: nn.Module) -> dict[str, float]:
        """Fresh run, step 0: cache ``e_init`` from ``policy`` (== the pretrained model) and ``e_ref``.

        The only time the pretrained model's probe errors are computed. Returns the step-0 metrics.
        """
        if self._started:
            raise RuntimeError("ReferenceManager already started")
        if self.probe is not None:
            self.e_init = self._errors(policy)
            if self._reference is not None:
                self.e_ref = self._errors(self._reference)
        self._started = True
        return {**self._ref_metrics(), **self._kl_metrics(self.e_init)}

    def divergence(self, policy: nn.Module) -> float:
        """``D(policy || init) = mean_p |e_policy[p] - e_init[p]|`` on the probe (one probe forward)."""
        self._require_started()
        if self.e_init is None:
            raise RuntimeError("no probe set: D cannot be estimated (pass probe and errors_fn)")
        return float(error_divergence(self._errors(policy), self.e_init))

    def measure(self, policy: nn.Module) -> dict[str, float]:
        """Eval-interval metrics: ``kl/policy_init``, ``kl/ref_init``, ``kl/policy_ref`` (+ ``_signed``) and
        ``ref/*``. One probe forward of the policy; the reference's errors are cached. Changes no state."""
        self._require_started()
        e_policy = self._errors(policy) if self.e_init is not None else None
        return {**self._ref_metrics(), **self._kl_metrics(e_policy)}

    # ------------------------------------------------------------------ the update rule
    def on_optimizer_step(self, step: int, policy: nn.Module) -> dict[str, float]:
        """Call after every optimizer step with ``step`` = optimizer steps done (1, 2, ...).

        ``periodic``: when ``step`` crosses a multiple of ``tau`` and the reference is not frozen, measure
        ``D(policy || init)``; copy ``policy`` into the reference iff ``D <= delta``, else freeze it (and with
        ``on_exceed="reinit"`` reset it to the pretrained weights). Returns ``ref/updates`` and ``ref/frozen``
        (periodic only), plus the ``kl/*`` metrics at a check. Other strategies: nothing to do, ``{}``.
        """
        self._require_started()
        if step <= self.last_step:
            raise ValueError(f"optimizer steps must increase: got step {step} after step {self.last_step}")
        due = step // self.tau > self.last_step // self.tau
        self.last_step = step
        if self.strategy != "periodic":
            return {}
        if not due or self.frozen:
            return self._ref_metrics()
        assert self._reference is not None and self.e_init is not None
        e_policy = self._errors(policy)  # (P,)
        d = float(error_divergence(e_policy, self.e_init))
        self.last_divergence = d
        if d <= self.delta:  # (update iff D <= delta; NaN is never <= delta)
            self.copy_fn(unwrap(policy), unwrap(self._reference))
            self.updates += 1
            self.reference_is_pretrained = False
            self.e_ref = self._errors(self._reference)
            logger.info(
                "step %d: D=%.6g <= delta=%.6g, reference updated (%d)", step, d, self.delta, self.updates
            )
        else:
            self.frozen = True
            self.frozen_at_step = step
            if self.on_exceed == "reinit":
                assert self.pretrained_fn is not None
                self.copy_fn(self.pretrained_fn(), unwrap(self._reference))
                self.reference_is_pretrained = True
                self.e_ref = self._errors(self._reference)
            logger.info(
                "step %d: D=%.6g > delta=%.6g, reference %s for the rest of the run",
                step,
                d,
                self.delta,
                "reset to the pretrained weights and frozen" if self.on_exceed == "reinit" else "frozen",
            )
        return {**self._ref_metrics(), **self._kl_metrics(e_policy)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs except the reference weights (see :meth:`reference_state_dict`)."""
        self._require_started()
        return {
            "format": _STATE_FORMAT,
            "strategy": self.strategy,
            "tau": self.tau,
            "delta": self.delta,
            "on_exceed": self.on_exceed,
            "updates": self.updates,
            "frozen": self.frozen,
            "frozen_at_step": self.frozen_at_step,
            "last_step": self.last_step,
            "last_divergence": self.last_divergence,
            "reference_is_pretrained": self.reference_is_pretrained,
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "e_init": None if self.e_init is None else self.e_init.clone(),
            "e_ref": None if self.e_ref is None else self.e_ref.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: restore counters, flags, the probe set and the cached errors (no probe forward).

        The reference weights are restored separately (:meth:`load_reference_state_dict`) unless
        ``reference_is_pretrained``. A different strategy raises; a changed tau/delta/on_exceed is used from
        now on, with a warning.
        """
        if self._started:
            raise RuntimeError("load_state_dict must replace initialize(), not follow it")
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported ReferenceManager state format {state.get('format')!r}")
        if state["strategy"] != self.strategy:
            raise ValueError(
                f"checkpoint was written with reference strategy {state['strategy']!r}, config says "
                f"{self.strategy!r}; a run cannot change strategy on resume"
            )
        for key in ("tau", "delta", "on_exceed"):
            if state[key] != getattr(self, key):
                logger.warning(
                    "reference.%s changed on resume: %r -> %r", key, state[key], getattr(self, key)
                )
        self.updates = int(state["updates"])
        self.frozen = bool(state["frozen"])
        self.frozen_at_step = state["frozen_at_step"]
        self.last_step = int(state["last_step"])
        self.last_divergence = state["last_divergence"]
        self.reference_is_pretrained = bool(state["reference_is_pretrained"])
        if state["probe"] is not None:
            if self.errors_fn is None:
                raise ValueError(
                    "checkpoint has a probe set but this manager has no errors_fn to evaluate it"
                )
            self.probe = Probe.from_state_dict(state["probe"]).to(self.device)
        elif self.probe is not None:
            raise ValueError("checkpoint has no probe set but this manager was given one")
        self.e_init = None if state["e_init"] is None else state["e_init"].clone()
        self.e_ref = None if state["e_ref"] is None else state["e_ref"].clone()
        self._started = True

    def reference_state_dict(self, *, rank0_only: bool = False) -> dict[str, Tensor]:
        """Full CPU weights of the reference (gathered under ZeRO-3: call on every rank), ``{}`` without one.

        Not needed while :attr:`reference_is_pretrained` (the pretrained weights reload from disk)."""
        if self._reference is None:
            return {}
        return full_state_dict(self._reference, rank0_only=rank0_only)

    def load_reference_state_dict(self, state: dict[str, Tensor]) -> None:
        """Write saved reference weights back into the live reference in place (collective under ZeRO-3)."""
        if self._reference is None:
            if state:
                raise ValueError(f"strategy {self.strategy!r} has no live reference to load weights into")
            return
        load_full_state_dict(self._reference, state)
