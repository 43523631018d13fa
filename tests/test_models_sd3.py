"""SD3 family (rectified flow, MMDiT): the tiny pipeline and ``SD3Adapter``.

Uses the session fixture ``tiny_sd3`` (``make_tiny_pipeline(..., family="sd3")``, preset "test": CLIP-L/G
hidden 32 each, a 1-layer T5 with d_model 64, a 2-block VAE, FlowMatchEuler with shift 3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from prefopt_core.models.registry import get_adapter
from prefopt_core.models.sd3 import SD3Adapter
from tests._fixed_batch_dpo import fit_fixed_batch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning against other processes'
    work make these tiny models many times slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd3(tiny_sd3) -> SD3Adapter:
    """The adapter with a short T5 sequence (16 tokens) to keep encoding cheap."""
    return get_adapter("sd3", tiny_sd3, max_sequence_length=16)


def _generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def test_tiny_sd3_save_load_roundtrip_generates_the_same_32px_image(tiny_sd3, tmp_path):
    """A plain ``StableDiffusion3Pipeline.from_pretrained(dir)`` loads the tiny model (T5 included), makes a
    32 x 32 RGB image (transformer sample size 16 latents x VAE factor 2), and saving + reloading it keeps
    every weight, so the same generator gives the same image."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is not None
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0

    pipe.save_pretrained(tmp_path / "copy")
    back = StableDiffusion3Pipeline.from_pretrained(tmp_path / "copy")
    back.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}.{k}")
    np.testing.assert_allclose(_generate(back), image, rtol=0, atol=1e-6)


def test_encode_prompts_and_images_shapes(sd3):
    """CLIP-L and CLIP-G penultimate states (32 + 32 = 64 channels, 77 tokens) padded to the T5 width
    (64) and followed by 16 T5 tokens: (N, 77 + 16, 64); pooled = the two projections, 32 + 32 = 64.
    Images 32 px -> 4 latent channels at 16 x 16."""
    cond = sd3.encode_prompts(["a red circle", "a blue square"])
    assert cond["prompt_embeds"].shape == (2, 77 + 16, 64)
    assert cond["pooled_prompt_embeds"].shape == (2, 64)
    latents = sd3.encode_images(torch.zeros(3, 3, 32, 32))
    assert latents.shape == (3, 4, 16, 16)
    assert sd3.side_conditioning(torch.zeros(3, 2), torch.zeros(3, 2), 32) == {}
    assert sd3.schedule.kind == "flow" and sd3.schedule.num_train_timesteps == 1000


def test_noisy_latents_and_target_match_hand_values(sd3):
    """Flow schedule with shift 3: index t (ascending noise) has unshifted s = (t + 1) / 1000 and
    σ = 3 s / (1 + 2 s). t = 0: σ = 0.003 / 1.002 = 0.00299401; t = 499: s = 0.5, σ = 1.5 / 2 = 0.75;
    t = 999: σ = 3 / 3 = 1.
    x_t = (1 − σ) x0 + σ ε with x0 = 2, ε = −1: 2 − 3σ = 1.99101796, −0.25, −1.
    target v = ε − x0 = −3 for every t."""
    t = torch.tensor([0, 499, 999])
    sigma = torch.tensor([0.003 / 1.002, 0.75, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sd3.schedule.table[t], sigma, rtol=1e-6, atol=1e-7)
    x0 = torch.full((3, 4, 2, 2), 2.0)
    eps = torch.full((3, 4, 2, 2), -1.0)
    x_t = sd3.noisy_latents(x0, eps, t)
    torch.testing.assert_close(x_t[:, 0, 0, 0], torch.tensor([1.99101796, -0.25, -1.0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sd3.target(x0, eps, t), torch.full((3, 4, 2, 2), -3.0))


class _RecordingDenoiser(nn.Module):
    """Stands in for the transformer: records its inputs and returns ``scale * hidden_states``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls: list[dict] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=True):
        self.calls.append(
            {"timestep": timestep, "text": encoder_hidden_states.shape, "pooled": pooled_projections.shape}
        )
        return (self.scale * hidden_states,)


def test_predict_feeds_sigma_times_T_as_the_transformer_timestep(sd3):
    """diffusers' SD3 scripts feed the transformer ``timestep = σ · 1000``: (0.00299401, 0.75, 1) ->
    (2.99401, 750, 1000); text and pooled embeddings pass through with their shapes."""
    model = _RecordingDenoiser()
    x_t = torch.ones(3, 4, 2, 2)
    cond = {"prompt_embeds": torch.zeros(3, 93, 64), "pooled_prompt_embeds": torch.zeros(3, 64)}
    out = sd3.predict(model, x_t, torch.tensor([0, 499, 999]), cond)
    torch.testing.assert_close(out, torch.full((3, 4, 2, 2), 2.0))
    (call,) = model.calls
    torch.testing.assert_close(
        call["timestep"], torch.tensor([2.994012, 750.0, 1000.0]), rtol=1e-5, atol=1e-4
    )
    assert call["text"] == (3, 93, 64) and call["pooled"] == (3, 64)


def test_load_denoiser_reads_an_exported_transformer(sd3, tmp_path):
    model = sd3.load_denoiser()
    with torch.no_grad():
        next(model.parameters()).add_(0.25)
    model.save_pretrained(tmp_path / "transformer")
    back = sd3.load_denoiser(tmp_path / "transformer")
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_thirty_dpo_steps_on_a_fixed_batch_lower_the_loss(sd3):
    """Same protocol as the UNet families (tests/_fixed_batch_dpo.py), with SD3's logit-normal timestep
    sampling: 4 toy-world pairs (outlined chosen, plain rejected), fixed epoch (fixed noise and σ),
    β = 5000, AdamW lr 1e-4, frozen reference.

    Expected: ln 2 = 0.6931 before training (policy == reference, every logit 0), below 0.1 after 30
    steps with implicit accuracy 1, reference errors unchanged. Fails if x_t ignores x0 (e_w == e_l, the
    loss stays ln 2), if the transformer gets no gradient, or if the reference aliases the policy.
    """
    res = fit_fixed_batch(sd3, steps=30, sampling="logit_normal")
    assert res.loss_before == pytest.approx(math.log(2), abs=1e-3)
    assert res.loss_after < 0.1
    assert res.acc_after == 1.0
    assert res.max_weight_change > 0
    torch.testing.assert_close(res.ref_err_after, res.ref_err_before, rtol=0, atol=0)
