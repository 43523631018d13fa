"""Reference strategies (frozen, Rethinking-DPO periodic update, precomputed/none) and the probe set.

Most tests use two tiny models:

* ``_Drift``: ``nn.Linear(4, 1, bias=False)`` starting at ``w = 0``, whose "optimizer step" adds 1 to every
  weight, with ``errors_fn = x_p . w`` on an all-ones probe latent ``x_p`` (``C, h, w = 1, 2, 2``). After k
  steps ``w = k * 1_4``, so ``e_p = 4k`` for every probe sample and, with ``e_init = 0``,
  ``D_k = mean_p |4k - 0| = 4k``: every divergence below is derived from that.
* ``_mlp``: a small MLP trained with plain SGD on a fixed regression task, i.e. a policy that actually trains,
  with ``errors_fn`` = per-sample MSE of its noise prediction on the probe.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from prefopt_core.probe import Probe, build_probe, probe_errors
from prefopt_core.reference import ReferenceManager
from prefopt_core.weights import full_state_dict, load_full_state_dict, unwrap, zero3_copy

T = 1000


# ------------------------------------------------------------------------------------------ helpers
def _drift_model() -> nn.Linear:
    m = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(m.weight)
    return m


@torch.no_grad()
def _drift_step(m: nn.Linear) -> None:
    m.weight.add_(1.0)


def _ones_probe(size: int = 2) -> Probe:
    return Probe(
        latents=torch.ones(size, 1, 2, 2),
        cond={},
        noise=torch.zeros(size, 1, 2, 2),
        t=torch.arange(size, dtype=torch.int64),
    )


def _drift_errors(m: nn.Module, p: Probe) -> torch.Tensor:
    return (p.latents.flatten(1) @ m.weight.T).squeeze(1)  # (P,) = x_p . w


class _Counting:
    """errors_fn wrapper that counts calls per model object."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[int] = []

    def __call__(self, m: nn.Module, p: Probe) -> torch.Tensor:
        self.calls.append(id(m))
        return self.fn(m, p)

    def count(self, m: nn.Module) -> int:
        return self.calls.count(id(m))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def _mlp_errors(m: nn.Module, p: Probe) -> torch.Tensor:
    x_t = (1 - p.t.float().view(-1, 1, 1, 1) / T) * p.latents + p.t.float().view(-1, 1, 1, 1) / T * p.noise
    pred = m(x_t.flatten(1))  # (P, 8)
    return (pred - p.noise.flatten(1)).pow(2).mean(1)  # (P,)


def _mlp_probe() -> Probe:
    g = torch.Generator().manual_seed(1)
    return build_probe(torch.randn(6, 2, 2, 2, generator=g), {}, size=4, num_train_timesteps=T, seed=0)


class _SGDTrainer:
    """Deterministic plain-SGD regression steps, ``w -= 0.1 * grad`` (no optimizer state, so a resume is exact;
    written out rather than torch.optim.SGD, whose first step costs seconds of lazy imports)."""

    def __init__(self, model: nn.Module) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(16, 8, generator=g)
        self.y = torch.randn(16, 8, generator=g)
        self.model = model

    def step(self) -> None:
        _sgd_step(self.model, (self.model(self.x) - self.y).pow(2).mean(), lr=0.1)


def _sgd_step(model: nn.Module, loss: torch.Tensor, *, lr: float) -> None:
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ probe
def test_build_probe_is_seeded_and_stratified() -> None:
    """First `size` latents; noise/timesteps from the seed only; T=1000, size=4 -> t[p] in [250p, 250(p+1))."""
    latents = torch.arange(6 * 4, dtype=torch.float32).view(6, 1, 2, 2)
    cond = {"prompt_embeds": torch.arange(6 * 3, dtype=torch.float32).view(6, 3)}
    a = build_probe(latents, cond, size=4, num_train_timesteps=T, seed=7)
    b = build_probe(latents, cond, size=4, num_train_timesteps=T, seed=7)
    c = build_probe(latents, cond, size=4, num_train_timesteps=T, seed=8)
    assert torch.equal(a.latents, latents[:4]) and torch.equal(
        a.cond["prompt_embeds"], cond["prompt_embeds"][:4]
    )
    assert torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t)
    assert not torch.equal(a.noise, c.noise)
    assert a.t.dtype == torch.int64
    for p, t in enumerate(a.t.tolist()):
        assert 250 * p <= t < 250 * (p + 1)
    with pytest.raises(ValueError, match="probe_size"):
        build_probe(latents, cond, size=7, num_train_timesteps=T, seed=0)


def test_probe_errors_chunked_equal_whole_and_restore_train_mode() -> None:
    """Chunks of 1 or 3 give the same (P,) errors as one pass; the model is evaluated in eval mode and each
    submodule's own train/eval flag is restored (the frozen Tanh stays in eval)."""
    model, probe = _mlp(), _mlp_probe()
    model.train()
    model[1].eval()
    seen_modes: list[bool] = []

    def fn(m: nn.Module, p: Probe) -> torch.Tensor:
        seen_modes.append(m.training)
        return _mlp_errors(m, p)

    whole = probe_errors(model, probe, fn, chunk_size=8)
    for chunk in (1, 3):
        assert torch.allclose(probe_errors(model, probe, fn, chunk_size=chunk), whole, rtol=0, atol=1e-7)
    assert whole.shape == (4,)
    assert seen_modes and not any(seen_modes)
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        probe_errors(model, probe, lambda m, p: torch.zeros(1), chunk_size=8)


# ------------------------------------------------------------------------------------------ periodic rule
def test_reference_equals_policy_after_tau_steps_and_not_before() -> None:
    """tau = 3, delta = inf: after steps 1, 2 the reference still holds the initial weights (!= policy); after
    step 3 it equals the trained policy in every parameter; after step 4 it keeps the step-3 weights."""
    policy = _mlp()
    init = copy.deepcopy(policy)
    reference = copy.deepcopy(policy)
    trainer = _SGDTrainer(policy)
    manager = ReferenceManager(
        "periodic", loss_name="dpo", reference=reference, probe=_mlp_probe(), errors_fn=_mlp_errors, tau=3
    )
    manager.initialize(policy)
    for step in (1, 2):
        trainer.step()
        manager.on_optimizer_step(step, policy)
        assert _equal(reference, init) and not _equal(reference, policy)
    trainer.step()
    out = manager.on_optimizer_step(3, policy)
    assert _equal(reference, policy)
    assert out["ref/updates"] == 1.0 and out["ref/frozen"] == 0.0
    assert out["kl/policy_init"] > 0 and out["kl/policy_ref"] == 0.0
    snapshot = copy.deepcopy(policy)
    trainer.step()
    manager.on_optimizer_step(4, policy)
    assert _equal(reference, snapshot) and not _equal(reference, policy)


@pytest.mark.parametrize("steps,tau", [(7, 2), (9, 3)])
def test_delta_zero_never_moves_and_delta_inf_always_updates(steps: int, tau: int) -> None:
    """delta = 0: at the first check the trained policy has D > 0, so the reference freezes at the initial
    weights and never moves (0 updates). delta = inf: every check updates, steps // tau updates in all
    (7 // 2 = 3, 9 // 3 = 3), and the reference ends equal to the policy at step tau * (steps // tau)."""
    results = {}
    for delta in (0.0, math.inf):
        policy = _mlp()
        init, reference = copy.deepcopy(policy), copy.deepcopy(policy)
        trainer = _SGDTrainer(policy)
        manager = ReferenceManager(
            "periodic",
            loss_name="dpo",
            reference=reference,
            probe=_mlp_probe(),
            errors_fn=_mlp_errors,
            tau=tau,
            delta=delta,
        )
        manager.initialize(policy)
        last_copy = None
        for step in range(1, steps + 1):
            trainer.step()
            manager.on_optimizer_step(step, policy)
            if step % tau == 0:
                last_copy = copy.deepcopy(policy)
            if delta == 0.0:
                assert _equal(reference, init)
        results[delta] = manager
        if delta == math.inf:
            assert _equal(reference, last_copy)
    assert results[0.0].updates == 0 and results[0.0].frozen and results[0.0].frozen_at_step == tau
    assert results[0.0].last_divergence > 0
    assert results[math.inf].updates == steps // tau and not results[math.inf].frozen


def test_delta_zero_also_stops_a_policy_that_fits_the_probe_better() -> None:
    """_Drift with steps w -= 1: e_p = -4k < e_init = 0, the signed shift is -4k < 0 but D = |-4k| = 4k > 0,
    so with delta = 0 the check at tau = 2 freezes (D = 8): D is two-sided, a signed mean would update."""
    policy = _drift_model()
    reference = copy.deepcopy(policy)
    manager = ReferenceManager(
        "periodic",
        loss_name="dpo",
        reference=reference,
        probe=_ones_probe(),
        errors_fn=_drift_errors,
        tau=2,
        delta=0.0,
    )
    manager.initialize(policy)
    for step in (1, 2):
        with torch.no_grad():
            policy.weight.sub_(1.0)
        out = manager.on_optimizer_step(step, policy)
    assert out["kl/policy_init"] == pytest.approx(8.0) and out["kl/policy_init_signed"] == pytest.approx(-8.0)
    assert manager.frozen and manager.updates == 0
    assert torch.equal(reference.weight, torch.zeros(1, 4))


@pytest.mark.parametrize("on_exceed", ["freeze", "reinit"])
def test_on_exceed_freeze_keeps_last_copy_reinit_restores_pretrained(on_exceed: str) -> None:
    """_Drift, tau = 2, delta = 10: D_2 = 8 <= 10 -> copy (reference w = 2); D_4 = 16 > 10 -> exceeded at
    step 4. freeze: the reference keeps w = 2; reinit: it is reset to the pretrained w = 0 exactly. Either way
    it stays there (steps 5..8 move nothing, no further checks): updates = 1, frozen."""
    policy = _drift_model()
    reference = copy.deepcopy(policy)
    pretrained = copy.deepcopy(policy)  # what adapter.load_denoiser() would return
    loads = []
    manager = ReferenceManager(
        "periodic",
        loss_name="kto",
        reference=reference,
        probe=_ones_probe(),
        errors_fn=_drift_errors,
        tau=2,
        delta=10.0,
        on_exceed=on_exceed,
        pretrained_fn=lambda: loads.append(1) or pretrained,
    )
    manager.initialize(policy)
    metrics = {}
    for step in range(1, 9):
        _drift_step(policy)
        metrics[step] = manager.on_optimizer_step(step, policy)
        if step == 2:
            assert torch.equal(reference.weight, torch.full((1, 4), 2.0))
    assert metrics[2]["kl/policy_init"] == pytest.approx(8.0)
    assert metrics[4]["kl/policy_init"] == pytest.approx(16.0) and metrics[4]["ref/frozen"] == 1.0
    expected = 2.0 if on_exceed == "freeze" else 0.0
    assert torch.equal(reference.weight, torch.full((1, 4), expected))
    assert manager.updates == 1 and manager.frozen and manager.frozen_at_step == 4
    assert manager.reference_is_pretrained == (on_exceed == "reinit")
    assert len(loads) == (1 if on_exceed == "reinit" else 0)
    # kl/ref_init after the event: reference errors 4 * expected vs e_init = 0.
    assert metrics[4]["kl/ref_init"] == pytest.approx(4 * expected)
    assert all("kl/policy_init" not in metrics[s] for s in (5, 6, 7, 8))
    assert metrics[8] == {"ref/updates": 1.0, "ref/frozen": 1.0}


def test_divergence_uses_init_errors_cached_once() -> None:
    """Counting errors_fn (chunk >= P): initialize() evaluates the policy once (e_init) and the reference once.
    Each later check evaluates the policy once and, after a copy, the reference once — the pretrained model
    is never evaluated again. At step 4 the init weights exist nowhere (the reference was copied at step 2,
    w = 2), yet D_4 = 16 = |4 * 4 - 0|: it used the cached e_init = 0. measure() adds one policy call."""
    policy = _drift_model()
    reference = copy.deepcopy(policy)
    fn = _Counting(_drift_errors)
    manager = ReferenceManager(
        "periodic", loss_name="dpo", reference=reference, probe=_ones_probe(), errors_fn=fn, tau=2
    )
    manager.initialize(policy)
    assert (fn.count(policy), fn.count(reference)) == (1, 1)
    out = {}
    for step in range(1, 5):
        _drift_step(policy)
        out[step] = manager.on_optimizer_step(step, policy)
    assert (fn.count(policy), fn.count(reference)) == (3, 3)
    assert out[4]["kl/policy_init"] == pytest.approx(16.0)
    assert out[4]["kl/ref_init"] == pytest.approx(16.0) and out[4]["kl/policy_ref"] == 0.0
    assert torch.equal(manager.e_init, torch.zeros(2))
    _drift_step(policy)  # w = 5, reference w = 4: policy_init = 20, ref_init = 16, policy_ref = 4
    measured = manager.measure(policy)
    assert measured["kl/policy_init"] == pytest.approx(20.0)
    assert measured["kl/ref_init"] == pytest.approx(16.0)
    assert measured["kl/policy_ref"] == pytest.approx(4.0)
    assert (fn.count(policy), fn.count(reference)) == (4, 3)


def test_state_dict_roundtrip_continues_identically() -> None:
    """Run A: 12 uninterrupted SGD steps, tau = 2, delta between D at steps 4 and 6 of A (so the run updates,
    then freezes mid-way). Run B: 4 steps, save (policy, manager state, reference weights), rebuild everything
    from scratch (fresh modules, fresh manager, counting errors_fn), load, continue to 12. B's metrics at
    steps 5..12 (step 5 is no check: the restored last step matters) and final reference equal A's, and
    loading never re-evaluates the pretrained model."""

    def run(manager: ReferenceManager, policy: nn.Module, trainer: _SGDTrainer, steps: range) -> dict:
        return {s: (trainer.step(), manager.on_optimizer_step(s, policy))[1] for s in steps}

    def fresh(delta: float, fn=_mlp_errors) -> tuple[nn.Module, nn.Module, ReferenceManager]:
        policy = _mlp()
        reference = copy.deepcopy(policy)
        manager = ReferenceManager(
            "periodic",
            loss_name="dpo",
            reference=reference,
            probe=_mlp_probe(),
            errors_fn=fn,
            tau=2,
            delta=delta,
        )
        return policy, reference, manager

    # find D at steps 4 and 6 of an always-updating run to place delta between them
    policy, _, probe_run = fresh(math.inf)
    probe_run.initialize(policy)
    d = run(probe_run, policy, _SGDTrainer(policy), range(1, 7))
    d4, d6 = d[4]["kl/policy_init"], d[6]["kl/policy_init"]
    assert d6 > d4 > 0
    delta = (d4 + d6) / 2

    policy_a, reference_a, manager_a = fresh(delta)
    manager_a.initialize(policy_a)
    out_a = run(manager_a, policy_a, _SGDTrainer(policy_a), range(1, 13))
    assert manager_a.updates == 2 and manager_a.frozen_at_step == 6

    policy_b, reference_b, manager_b = fresh(delta)
    manager_b.initialize(policy_b)
    run(manager_b, policy_b, _SGDTrainer(policy_b), range(1, 5))
    saved = (
        copy.deepcopy(policy_b.state_dict()),
        copy.deepcopy(manager_b.state_dict()),
        manager_b.reference_state_dict(),
    )

    counting = _Counting(_mlp_errors)
    policy_c, reference_c, manager_c = fresh(delta, counting)
    policy_c.load_state_dict(saved[0])
    manager_c.load_state_dict(saved[1])
    manager_c.load_reference_state_dict(saved[2])
    assert _equal(reference_c, reference_b) and not _equal(reference_c, _mlp())
    assert counting.calls == []
    out_c = run(manager_c, policy_c, _SGDTrainer(policy_c), range(5, 13))
    assert "kl/policy_init" not in out_c[5]
    for step in range(5, 13):
        assert out_c[step] == pytest.approx(out_a[step]), step
    assert _equal(reference_c, reference_a)
    assert manager_c.state_dict()["frozen_at_step"] == 6 and manager_c.updates == 2


# ------------------------------------------------------------------------------------------ other strategies
def test_frozen_reference_never_changes_and_reports_kl() -> None:
    """frozen: on_optimizer_step does nothing ({}); measure reports D of the policy against the cached init."""
    policy = _drift_model()
    reference = copy.deepcopy(policy)
    manager = ReferenceManager(
        "frozen", loss_name="dpo", reference=reference, probe=_ones_probe(), errors_fn=_drift_errors
    )
    manager.initialize(policy)
    for step in range(1, 5):
        _drift_step(policy)
        assert manager.on_optimizer_step(step, policy) == {}
    assert torch.equal(reference.weight, torch.zeros(1, 4)) and not reference.weight.requires_grad
    m = manager.measure(policy)
    assert m["kl/policy_init"] == pytest.approx(16.0) and m["kl/ref_init"] == 0.0
    assert m["kl/policy_ref"] == pytest.approx(16.0)


@pytest.mark.parametrize("strategy,loss", [("precomputed", "dpo"), ("none", "mapo"), ("none", "sft")])
def test_precomputed_and_none_hold_no_reference(strategy: str, loss: str) -> None:
    policy = _drift_model()
    manager = ReferenceManager(strategy, loss_name=loss, probe=_ones_probe(), errors_fn=_drift_errors)
    manager.initialize(policy)
    assert manager.reference is None and manager.reference_state_dict() == {}
    _drift_step(policy)
    assert manager.on_optimizer_step(1, policy) == {}
    assert manager.measure(policy) == pytest.approx({"kl/policy_init": 4.0, "kl/policy_init_signed": 4.0})


@pytest.mark.parametrize(
    ("loss", "allowed"),
    [
        ("dpo", {"frozen", "periodic", "precomputed"}),
        ("kto", {"frozen", "periodic", "precomputed"}),
        ("mapo", {"none"}),
        ("sft", {"none"}),
    ],
)
def test_check_strategy_is_the_loss_reference_rule(loss: str, allowed: set[str]) -> None:
    """Losses with a reference (dpo, kto) take any strategy but none; reference-free ones only none."""
    from prefopt_core.reference import STRATEGIES, check_strategy

    for strategy in STRATEGIES:
        if strategy in allowed:
            check_strategy(loss, strategy)
        else:
            with pytest.raises(ValueError, match=f"loss.name={loss}"):
                check_strategy(loss, strategy)


def test_invalid_combinations_fail_loudly() -> None:
    ref = _drift_model()
    with pytest.raises(ValueError, match="valid strategies"):
        ReferenceManager("ema", loss_name="dpo", reference=ref)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference-free"):
        ReferenceManager("frozen", loss_name="mapo", reference=ref)
    with pytest.raises(ValueError, match="cannot be 'none'"):
        ReferenceManager("none", loss_name="kto")
    with pytest.raises(ValueError, match="needs the reference module"):
        ReferenceManager("periodic", loss_name="dpo", probe=_ones_probe(), errors_fn=_drift_errors)
    with pytest.raises(ValueError, match="needs a probe"):
        ReferenceManager("periodic", loss_name="dpo", reference=ref)
    with pytest.raises(ValueError, match="pretrained_fn"):
        ReferenceManager(
            "periodic",
            loss_name="dpo",
            reference=ref,
            probe=_ones_probe(),
            errors_fn=_drift_errors,
            on_exceed="reinit",
        )
    with pytest.raises(ValueError, match="valid options"):
        ReferenceManager("frozen", loss_name="dpo", reference=ref, on_exceed="reset")  # type: ignore[arg-type]
    manager = ReferenceManager(
        "periodic", loss_name="dpo", reference=ref, probe=_ones_probe(), errors_fn=_drift_errors
    )
    with pytest.raises(RuntimeError, match="initialize"):
        manager.on_optimizer_step(1, ref)
    manager.initialize(_drift_model())
    manager.on_optimizer_step(2, ref)
    with pytest.raises(ValueError, match="must increase"):
        manager.on_optimizer_step(2, ref)
    other = ReferenceManager("frozen", loss_name="dpo", reference=_drift_model())
    with pytest.raises(ValueError, match="cannot change strategy"):
        other.load_state_dict(manager.state_dict())


def test_from_config_reads_the_reference_section() -> None:
    from prefopt_core.config import load_config

    cfg = load_config(None, ["reference.strategy=periodic", "reference.tau=4", "reference.delta=0.5"])
    manager = ReferenceManager.from_config(
        cfg.reference,
        loss_name=cfg.loss.name,
        reference=_drift_model(),
        probe=_ones_probe(),
        errors_fn=_drift_errors,
    )
    assert (manager.strategy, manager.tau, manager.delta, manager.on_exceed) == ("periodic", 4, 0.5, "freeze")


# ------------------------------------------------------------------------------------------ weight copies
def test_zero3_copy_and_full_state_dict_on_ordinary_modules() -> None:
    """Without partitioned parameters zero3_copy is a plain in-place copy (parameter objects kept, values cast
    to the destination dtype, buffers copied), and full_state_dict/load_full_state_dict round-trip."""
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        src[1].running_mean.fill_(0.5)
    dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    weight = dst[0].weight
    zero3_copy(src, dst)
    assert dst[0].weight is weight and dst[0].weight.dtype == torch.bfloat16
    assert torch.equal(dst[0].weight, src[0].weight.to(torch.bfloat16))
    assert torch.equal(dst[1].running_mean, torch.full((4,), 0.5, dtype=torch.bfloat16))
    state = full_state_dict(src)
    assert set(state) == set(src.state_dict())
    assert full_state_dict(src, rank0_only=True).keys() == state.keys()  # one process = rank 0
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_full_state_dict(fresh, state)
    assert _equal(fresh, src)
    with pytest.raises(ValueError, match="differ"):
        zero3_copy(nn.Linear(3, 4), nn.Linear(3, 4, bias=False))


def test_unwrap_only_unwraps_engine_like_wrappers() -> None:
    """A DeepSpeed engine (recognised by its module path) or DataParallel is unwrapped; a plain module that
    happens to have a child named `module` is not."""

    class FakeEngine(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = nn.Linear(2, 2)
    FakeEngine.__module__ = "deepspeed.runtime.engine"
    assert unwrap(FakeEngine(inner)) is inner
    assert unwrap(nn.DataParallel(inner)) is inner

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    plain = Plain()
    assert unwrap(plain) is plain


# ------------------------------------------------------------------------------------------ tiny SD3
def test_probe_errors_on_tiny_sd3_denoiser(tiny_sd3) -> None:
    """The family-agnostic errors path on a real denoiser: a periodic manager over the tiny SD3 transformer
    with the trainer's errors_fn (per_sample_mse of the flow-matching velocity). At step 0 D = 0; one SGD step
    on the probe's own flow-matching loss lowers the probe errors (signed shift < 0, D > 0), and the check at
    tau = 1 copies the policy into the reference exactly (kl/policy_ref = 0). Chunked errors match one pass."""
    from prefopt_core.models.base import per_sample_mse
    from prefopt_core.models.sd3 import SD3Adapter

    adapter = SD3Adapter(tiny_sd3)
    policy = adapter.load_denoiser()
    reference = adapter.load_denoiser()
    cfg = policy.config
    n, g = 3, torch.Generator().manual_seed(0)
    latents = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = {
        "prompt_embeds": torch.randn(n, 7, cfg.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(n, cfg.pooled_projection_dim, generator=g),
    }
    probe = build_probe(
        latents, cond, size=n, num_train_timesteps=adapter.schedule.num_train_timesteps, seed=0
    )

    def errors_fn(m: nn.Module, p: Probe) -> torch.Tensor:
        x_t = adapter.noisy_latents(p.latents, p.noise, p.t)
        return per_sample_mse(adapter.predict(m, x_t, p.t, p.cond), adapter.target(p.latents, p.noise, p.t))

    manager = ReferenceManager(
        "periodic",
        loss_name="dpo",
        reference=reference,
        probe=probe,
        errors_fn=errors_fn,
        tau=1,
        chunk_size=2,
    )
    start = manager.initialize(policy)
    assert start["kl/policy_init"] == 0.0 and start["kl/ref_init"] == 0.0
    assert torch.allclose(probe_errors(policy, probe, errors_fn, chunk_size=n), manager.e_init, atol=1e-6)

    _sgd_step(policy, errors_fn(policy, probe).mean(), lr=1e-2)
    out = manager.on_optimizer_step(1, policy)
    assert out["kl/policy_init"] > 0 and out["kl/policy_init_signed"] < 0
    assert out["kl/policy_ref"] == 0.0 and out["ref/updates"] == 1.0
    assert _equal(reference, policy)
