"""SDXL and SD1.5 (UNet, DDPM) families: tiny pipelines, adapters, forward-process maths, DPO fit.

Tiny pipelines are built once per module (offline, seeded) with ``make_tiny_pipeline`` and read back with
the plain diffusers ``from_pretrained`` a real checkpoint takes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefopt_core.models.registry import get_adapter
from prefopt_core.models.sd15 import SD15Adapter
from prefopt_core.models.sdxl import SDXLAdapter, sdxl_time_ids
from tests._fixed_batch_dpo import fit_fixed_batch

FAMILIES = ("sdxl", "sd15")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning against other processes'
    work make these tiny models many times slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet_dirs(tiny_unets):
    """``{"sdxl": dir, "sd15": dir}`` of tiny pipelines saved with ``save_pretrained`` (session fixture)."""
    return tiny_unets


@pytest.fixture(scope="module")
def adapters(unet_dirs):
    """One adapter per family (their encoder pipelines load lazily, once)."""
    return {f: get_adapter(f, unet_dirs[f]) for f in FAMILIES}


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


# ---------------------------------------------------------------------------------------- tiny pipelines
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_pipeline_loads_with_plain_from_pretrained_and_generates_32px(unet_dirs, family):
    """``from_pretrained(dir)`` with no extra arguments gives the family's pipeline, its shipped scheduler
    (SDXL: EulerDiscrete, SD1.5: PNDM) and null optional components; 2 denoising steps give a 32 x 32 RGB
    image because the UNet's default sample size is 16 latents and the 2-block VAE upsamples x2."""
    pipe = _pipeline_class(family).from_pretrained(unet_dirs[family])
    pipe.set_progress_bar_config(disable=True)
    expected_scheduler = "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler"
    assert type(pipe.scheduler).__name__ == expected_scheduler
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)
    assert pipe.feature_extractor is None and pipe.image_encoder is None
    if family == "sd15":
        assert pipe.safety_checker is None
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_sdxl_unet_config_is_consistent_with_its_encoders(unet_dirs):
    """SDXL's added embedding takes 6 time ids x addition_time_embed_dim + the pooled projection of text
    encoder 2: 6 * 8 + 32 = 80; cross-attention width is the two encoders' hidden sizes 32 + 32 = 64."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(unet_dirs["sdxl"])
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    proj = pipe.text_encoder_2.config.projection_dim
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + proj == 80
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == hidden == 64


# ---------------------------------------------------------------------------------------- adapters
def test_registry_has_one_adapter_per_family():
    """Every name of models.base.Family has exactly one registered adapter whose ``family`` is that name."""
    from prefopt_core.models.base import FAMILIES
    from prefopt_core.models.registry import ADAPTERS

    assert sorted(ADAPTERS) == sorted(FAMILIES) == ["sd15", "sd3", "sdxl"]
    assert all(cls.family == name for name, cls in ADAPTERS.items())


def test_unknown_family_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'sd2'; valid: sd3, sdxl, sd15"):
        get_adapter("sd2", tmp_path)


def test_get_adapter_dispatches_to_the_unet_families(adapters):
    assert isinstance(adapters["sdxl"], SDXLAdapter) and adapters["sdxl"].family == "sdxl"
    assert isinstance(adapters["sd15"], SD15Adapter) and adapters["sd15"].family == "sd15"
    for a in adapters.values():
        assert a.denoiser_subfolder == "unet"
        assert a.schedule.kind == "ddpm" and a.schedule.num_train_timesteps == 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_shapes(adapters, family):
    """N=2 captions -> CLIP sequences of 77 tokens; width 32 (SD1.5: one encoder) or 32 + 32 (SDXL), pooled
    32 (encoder 2's projection). N=3 images of 32 px -> 4 latent channels at 32 / 2 = 16."""
    a = adapters[family]
    cond = a.encode_prompts(["a red circle", "a blue square"])
    if family == "sdxl":
        assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"}
        assert cond["prompt_embeds"].shape == (2, 77, 64)
        assert cond["pooled_prompt_embeds"].shape == (2, 32)
    else:
        assert set(cond) == {"prompt_embeds"}
        assert cond["prompt_embeds"].shape == (2, 77, 32)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = a.encode_images(pixels)
    assert latents.shape == (3, 4, 16, 16) and latents.dtype == torch.float32
    x_t = a.noisy_latents(latents, torch.randn_like(latents), torch.tensor([0, 500, 999]))
    side = a.side_conditioning(torch.full((3, 2), 32), torch.zeros(3, 2, dtype=torch.int64), 32)
    cond3 = {k: v[:1].expand(3, *v.shape[1:]) for k, v in cond.items()} | side
    pred = a.predict(a.load_denoiser(), x_t, torch.tensor([0, 500, 999]), cond3)
    assert pred.shape == (3, 4, 16, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_images_is_the_scaled_posterior_mean(adapters, family):
    """Cached latents are ``mean(q(z|x)) * scaling_factor`` (SD1.5/SDXL VAEs have no shift): deterministic,
    so two calls agree exactly, and equal to the VAE's own posterior mean times the config's factor."""
    a = adapters[family]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vae = a._encoders().vae
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    got = a.encode_images(pixels)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(a.encode_images(pixels), got, rtol=0, atol=0)


def test_sdxl_text_conditioning_is_penultimate_hidden_states_and_pooled_projection(adapters):
    """SDXL (Podell et al. 2023; official Diffusion-DPO ``encode_prompt_sdxl``): prompt_embeds =
    concat(enc1.hidden_states[-2], enc2.hidden_states[-2]) on channels; pooled = enc2's projected pooled
    output (``text_embeds``)."""
    a = adapters["sdxl"]
    pipe = a._encoders()
    captions = ["a red circle", "a green triangle"]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out1 = pipe.text_encoder(ids.input_ids, output_hidden_states=True)
        out2 = pipe.text_encoder_2(ids.input_ids, output_hidden_states=True)
    cond = a.encode_prompts(captions)
    expected = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (2, 77, 64)
    torch.testing.assert_close(cond["prompt_embeds"], expected)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], out2.text_embeds)
    assert not torch.allclose(cond["prompt_embeds"][..., :32], out1.last_hidden_state)


def test_sd15_text_conditioning_is_last_hidden_state(adapters):
    """SD1.5 (official Diffusion-DPO: ``text_encoder(input_ids)[0]``): the last hidden state."""
    a = adapters["sd15"]
    pipe = a._encoders()
    ids = pipe.tokenizer(
        ["a red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = pipe.text_encoder(ids.input_ids).last_hidden_state
    torch.testing.assert_close(a.encode_prompts(["a red circle"])["prompt_embeds"], expected)


# ---------------------------------------------------------------------------------------- DDPM maths
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_latents_and_target_match_hand_values(unet_dirs, family, prediction_type):
    """scaled_linear betas: β_i = (√0.00085 + i/999 · (√0.012 − √0.00085))², ᾱ_t = Π_{i≤t} (1 − β_i).

    t = 0: ᾱ_0 = 1 − 0.00085 = 0.99915, √ᾱ = 0.99957491, √(1−ᾱ) = √0.00085 = 0.02915476. With x0 = 2 and
    ε = −1: x_t = 2·0.99957491 − 0.02915476 = 1.96999506; ε-target = −1;
    v = √ᾱ ε − √(1−ᾱ) x0 = −0.99957491 − 0.05830952 = −1.05788443.
    t = 999: ᾱ = 0.00466010 (the float64 product above; SD's well-known final alphas_cumprod ≈ 0.0047),
    so x_t = 2·√0.00466010 − √0.99533990 and v = −√0.00466010 − 2·√0.99533990.
    """
    a = get_adapter(family, unet_dirs[family], prediction_type=prediction_type)
    assert a.prediction_type == prediction_type
    assert a.schedule.table[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert a.schedule.table[999].item() == pytest.approx(0.00466010, rel=1e-4)
    x0 = torch.full((2, 4, 2, 2), 2.0)
    eps = torch.full((2, 4, 2, 2), -1.0)
    t = torch.tensor([0, 999])
    ab999 = 0.00466010
    expected_xt = torch.tensor([1.96999506, 2 * math.sqrt(ab999) - math.sqrt(1 - ab999)])
    torch.testing.assert_close(a.noisy_latents(x0, eps, t)[:, 0, 0, 0], expected_xt, rtol=1e-4, atol=1e-5)
    if prediction_type == "epsilon":
        expected_target = torch.tensor([-1.0, -1.0])
    else:
        expected_target = torch.tensor([-1.05788443, -math.sqrt(ab999) - 2 * math.sqrt(1 - ab999)])
    torch.testing.assert_close(a.target(x0, eps, t)[:, 0, 0, 0], expected_target, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prediction_type_comes_from_the_scheduler_config_unless_overridden(unet_dirs, family):
    """The tiny schedulers ship ``prediction_type="epsilon"``; an override reaches the training scheduler
    and the sampling pipeline; an unsupported type fails listing the valid ones."""
    assert get_adapter(family, unet_dirs[family]).prediction_type == "epsilon"
    v = get_adapter(family, unet_dirs[family], prediction_type="v_prediction")
    assert v.scheduler.config.prediction_type == "v_prediction"
    assert v.pipeline().scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        get_adapter(family, unet_dirs[family], prediction_type="sample")
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        get_adapter(family, unet_dirs[family], dtype="fp8")


# ---------------------------------------------------------------------------------------- SDXL micro-conditioning
def test_sdxl_time_ids_order_on_a_hand_example(adapters):
    """A 512 x 768 (h x w) image cropped at (top 10, left 20) for a 32 px target:
    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (512, 768, 10, 20, 32, 32),
    the order of ``StableDiffusionXLPipeline._get_add_time_ids``; ``"constant"`` (official Diffusion-DPO)
    gives (32, 32, 0, 0, 32, 32) whatever the image."""
    original = torch.tensor([[512, 768], [32, 32]])
    crop = torch.tensor([[10, 20], [0, 0]])
    ids = adapters["sdxl"].side_conditioning(original, crop, 32)["time_ids"]
    expected = torch.tensor([[512.0, 768.0, 10.0, 20.0, 32.0, 32.0], [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    pipe_ids = (
        adapters["sdxl"]
        .pipeline()
        ._get_add_time_ids(
            (512, 768), (10, 20), (32, 32), dtype=torch.float32, text_encoder_projection_dim=32
        )
    )
    torch.testing.assert_close(ids[:1], pipe_ids, rtol=0, atol=0)
    const = SDXLAdapter(adapters["sdxl"].pretrained, micro_conditioning="constant")
    torch.testing.assert_close(
        const.side_conditioning(original, crop, 32)["time_ids"],
        torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2),
    )
    assert const.fingerprint()["encoders"] != adapters["sdxl"].fingerprint()["encoders"]
    assert adapters["sd15"].side_conditioning(original, crop, 32) == {}


def test_sdxl_time_ids_reject_bad_shapes_and_options(adapters):
    with pytest.raises(ValueError, match=r"original_size must have shape \(N, 2\)"):
        sdxl_time_ids(torch.zeros(2, 3), torch.zeros(2, 2), 32)
    with pytest.raises(ValueError, match="rows"):
        sdxl_time_ids(torch.zeros(2, 2), torch.zeros(3, 2), 32)
    with pytest.raises(ValueError, match="per_image, constant"):
        SDXLAdapter(adapters["sdxl"].pretrained, micro_conditioning="official")


def test_sdxl_predict_feeds_pooled_embeds_and_time_ids_to_the_unet(adapters):
    """``predict`` == a direct UNet call with ``added_cond_kwargs={"text_embeds", "time_ids"}``; changing
    only the time ids changes the prediction (they reach the added embedding)."""
    a = adapters["sdxl"]
    unet = a.load_denoiser().eval()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    cond = a.encode_prompts(["a red circle", "a blue square"])
    cond["time_ids"] = sdxl_time_ids(torch.full((2, 2), 32), torch.zeros(2, 2), 32)
    with torch.no_grad():
        pred = a.predict(unet, x_t, t, cond)
        direct = unet(
            x_t,
            t,
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]},
        ).sample
        other = a.predict(unet, x_t, t, {**cond, "time_ids": cond["time_ids"] * 16})
    torch.testing.assert_close(pred, direct)
    assert (pred - other).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_load_denoiser_reads_an_exported_unet(adapters, family, tmp_path):
    """An exported UNet (``save_pretrained``) loads back through ``load_denoiser(path)`` unchanged."""
    a = adapters[family]
    unet = a.load_denoiser()
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)
    unet.save_pretrained(tmp_path / "unet")
    back = a.load_denoiser(tmp_path / "unet")
    for (name, p), q in zip(unet.state_dict().items(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- DPO fit
@pytest.mark.parametrize("family", FAMILIES)
def test_thirty_dpo_steps_on_a_fixed_batch_lower_the_loss(adapters, family):
    """4 toy-world pairs (chosen = outlined scene, rejected = the same scene plain), one fixed epoch, so
    noise and timesteps are fixed; β = 5000 (official default), AdamW lr 1e-4, frozen reference copy.

    Expected: before training policy == reference, so every DPO logit is 0 and the loss is ln 2 = 0.6931
    (up to ~1e-4 from kernel nondeterminism). A trainable objective must push it far down (below 0.1)
    with implicit accuracy 1 on the memorised batch, while the reference errors stay bit-identical.
    Fails if: x_t does not depend on x0 (then e_w == e_l for every pair and the loss stays ln 2), the
    denoiser gets no gradient (predict detached / wrong module), the reference aliases the policy, or the
    conditioning/timestep plumbing breaks the UNet call.
    """
    res = fit_fixed_batch(adapters[family], steps=30)
    assert res.loss_before == pytest.approx(math.log(2), abs=1e-3)
    assert res.loss_after < 0.1
    assert res.acc_after == 1.0
    assert res.max_weight_change > 0
    torch.testing.assert_close(res.ref_err_after, res.ref_err_before, rtol=0, atol=0)
