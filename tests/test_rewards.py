"""Tests for pipelines.rewards (scorers, factory), pipelines.clip_scorers (CLIP scorers, tiny CLIP) and
pipelines.toy_world.

Everything runs offline on a tiny random CLIP written by ``make_tiny_clip``. Run:
``.venv/bin/pytest tests/test_rewards.py -q``.
"""

from __future__ import annotations

import ast
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import clip_scorers, rewards
from pipelines.clip_scorers import (
    AestheticHead,
    AestheticScorer,
    ClipScorer,
    PickScoreScorer,
    load_aesthetic_head,
    make_tiny_clip,
    save_random_aesthetic_head,
)
from pipelines.rewards import BrightnessScorer, OutlineStyleScorer, build_scorer, outline_style_score
from pipelines.scoring import Scorer
from pipelines.toy_world import SHAPES, TOY_COLORS, draw_toy_image, outline_width, sample_toy_scene

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers is imported lazily (inside make_tiny_clip), after this line

PROMPTS = ["the cat", "a red dog", "a photo of the cat and the dog", "zebra!"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tiny models gain nothing from intra-op threads, which only stall when the 2 CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def head_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_aesthetic_head(tmp_path_factory.mktemp("head") / "head.safetensors", dim=16, seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Four random RGB images of different sizes (the processor resizes + centre-crops them to 32x32)."""
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (48, 40), (64, 64), (33, 70)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


@pytest.fixture(scope="module")
def clip_scorer(clip_dir: Path) -> ClipScorer:
    return ClipScorer(clip_dir)


@pytest.fixture(scope="module")
def pick_scorer(clip_dir: Path) -> PickScoreScorer:
    return PickScoreScorer(clip_dir)


@pytest.fixture(scope="module")
def aesthetic_scorer(clip_dir: Path, head_path: Path) -> AestheticScorer:
    return AestheticScorer(clip_dir, head_path)


@pytest.fixture(scope="module")
def reference(clip_dir: Path, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Raw outputs of the tiny CLIP, computed independently of the scorers (one joint forward pass)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    inputs = processor(
        text=PROMPTS,
        images=[im.convert("RGB") for im in images],
        return_tensors="pt",
        padding="max_length",
        max_length=77,
    )
    with torch.no_grad():
        out = model(**inputs)
        img_raw = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt_raw = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    return {
        "logits_per_image": out.logits_per_image,  # (N, N) = exp(s) * cos(image_i, text_j)
        "image_embeds": out.image_embeds,  # (N, D), unit norm
        "text_embeds": out.text_embeds,  # (N, D), unit norm
        "image_raw": clip_scorers._pooled(img_raw),  # (N, D), projected, not normalised
        "text_raw": clip_scorers._pooled(txt_raw),
        "logit_scale": model.logit_scale.detach(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Tiny CLIP
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_clip_loads_offline(clip_dir: Path) -> None:
    """The tokenizer merges "the" and "cat" into single tokens and wraps them with BOS/EOS; images -> 32x32."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    vocab = tok.get_vocab()
    assert len(tok) == 526
    ids = tok("The  cat")["input_ids"]
    assert ids == [tok.bos_token_id, vocab["the</w>"], vocab["cat</w>"], tok.eos_token_id]
    assert tok("zebra!")["input_ids"][1] == vocab["z"]  # unmerged word -> byte characters
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    batch = processor(text=["a cat"], images=[Image.new("RGB", (50, 40))], return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_make_tiny_clip_is_seeded_and_keeps_global_rng(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    make_tiny_clip(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(1), before)
    make_tiny_clip(tmp_path / "b", seed=0)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# CLIP / PickScore / aesthetic against hand computations
# ----------------------------------------------------------------------------------------------------------------


def test_clip_score_matches_hand_computation(clip_scorer: ClipScorer, images, reference) -> None:
    """CLIP score_i = 100 * <e_I_i, e_T_i> with unit-norm embeddings = 100 * logits_per_image[i, i] / exp(s)."""
    got = clip_scorer.score(images, PROMPTS)
    by_embeds = 100.0 * (reference["image_embeds"] * reference["text_embeds"]).sum(-1)
    by_logits = 100.0 * reference["logits_per_image"].diagonal() / reference["logit_scale"].exp()
    torch.testing.assert_close(got, by_embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, by_logits, atol=1e-4, rtol=1e-4)


def test_clip_score_clamp(clip_dir: Path, clip_scorer: ClipScorer, images) -> None:
    """torchmetrics convention: 100 * max(cos, 0)."""
    raw = clip_scorer.score(images, PROMPTS)
    clamped = ClipScorer(clip_dir, clamp_negative=True, scale=2.5).score(images, PROMPTS)
    torch.testing.assert_close(clamped, 2.5 * (raw / 100).clamp_min(0), atol=1e-5, rtol=1e-5)


def test_pickscore_matches_hand_computation(pick_scorer: PickScoreScorer, images, reference) -> None:
    """PickScore_i = exp(s) * <a_i/|a_i|, b_i/|b_i|>, a/b the raw projected image/text features.

    It is also the diagonal of CLIP's logits_per_image (same formula inside CLIPModel.forward).
    """
    a, b = reference["image_raw"], reference["text_raw"]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    expected = reference["logit_scale"].exp() * cos
    got = pick_scorer.score(images, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, reference["logits_per_image"].diagonal(), atol=1e-4, rtol=1e-4)


def test_aesthetic_head_matches_manual_forward() -> None:
    """The head has no activations, so in eval mode it is W4(W3(W2(W1(W0 x + b0) + b1) + b2) + b3) + b4."""
    torch.manual_seed(0)
    head = AestheticHead(16).eval()
    x = torch.randn(5, 16)
    sd = head.state_dict()
    h = x
    for i in (0, 2, 4, 6, 7):
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(head(x), h.squeeze(-1))
    assert [tuple(sd[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 16),
        (128, 1024),
        (64, 128),
        (16, 64),
        (1, 16),
    ]


def test_aesthetic_scorer_matches_manual(
    aesthetic_scorer: AestheticScorer, head_path: Path, images, reference
):
    """score_i = head(a_i / |a_i|), a the raw projected image features; prompts are ignored."""
    head = load_aesthetic_head(head_path)
    a = reference["image_raw"]
    with torch.no_grad():
        expected = head(a / a.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(aesthetic_scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aesthetic_scorer.score(images), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_head_pth_and_safetensors_agree(tmp_path: Path) -> None:
    a = load_aesthetic_head(save_random_aesthetic_head(tmp_path / "h.safetensors", dim=8, seed=3))
    b = load_aesthetic_head(save_random_aesthetic_head(tmp_path / "h.pth", dim=8, seed=3))
    assert not a.training and a.dim == 8
    x = torch.randn(4, 8)
    torch.testing.assert_close(a(x), b(x))


def test_aesthetic_errors(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expects 8-d embeddings"):
        AestheticScorer(clip_dir, save_random_aesthetic_head(tmp_path / "h8.safetensors", dim=8))
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an aesthetic head"):
        load_aesthetic_head(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="head_path"):
        load_aesthetic_head(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------------------------------
# Properties shared by every scorer
# ----------------------------------------------------------------------------------------------------------------

SCORER_FIXTURES = ["clip_scorer", "pick_scorer", "aesthetic_scorer", "outline", "brightness"]


@pytest.fixture
def outline() -> OutlineStyleScorer:
    return OutlineStyleScorer()


@pytest.fixture
def brightness() -> BrightnessScorer:
    return BrightnessScorer()


@pytest.mark.parametrize("fixture", SCORER_FIXTURES)
def test_scorer_contract(fixture: str, request: pytest.FixtureRequest, images) -> None:
    """(N,) finite float32; deterministic; identical (image, prompt) pairs score the same; N = 0 works."""
    scorer = request.getfixturevalue(fixture)
    assert isinstance(scorer, Scorer) and scorer.name in rewards.SCORERS
    batch = [*images, images[1]]
    prompts = [*PROMPTS, PROMPTS[1]]
    s1 = scorer.score(batch, prompts)
    s2 = scorer.score(batch, prompts)
    assert s1.shape == (5,) and s1.dtype == torch.float32 and torch.isfinite(s1).all()
    assert torch.equal(s1, s2)
    # Identical pairs: equal up to float rounding (BLAS may use another kernel for another row of a batch).
    torch.testing.assert_close(s1[1], s1[4], atol=1e-6, rtol=1e-6)
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        scorer.score(images, PROMPTS[:3])


@pytest.mark.parametrize("cls", [ClipScorer, PickScoreScorer])
def test_batch_size_does_not_change_scores(cls: Callable, clip_dir: Path, images) -> None:
    batch, prompts = images * 4, PROMPTS * 4  # 16 pairs
    one = cls(clip_dir, batch_size=1).score(batch, prompts)
    many = cls(clip_dir, batch_size=16).score(batch, prompts)
    odd = cls(clip_dir, batch_size=5).score(batch, prompts)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(odd, many, atol=1e-5, rtol=1e-5)


def test_aesthetic_batch_size_does_not_change_scores(clip_dir: Path, head_path: Path, images) -> None:
    one = AestheticScorer(clip_dir, head_path, batch_size=1).score(images * 4)
    many = AestheticScorer(clip_dir, head_path, batch_size=16).score(images * 4)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_bfloat16_runs(clip_dir: Path, clip_scorer: ClipScorer, images) -> None:
    got = ClipScorer(clip_dir, dtype="bfloat16").score(images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, clip_scorer.score(images, PROMPTS), atol=3.0, rtol=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Toy world + outline detector
# ----------------------------------------------------------------------------------------------------------------


def _jpeg90(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _down_up(img: Image.Image) -> Image.Image:
    """2x bilinear downscale then bilinear upscale (a blur like a lossy VAE round trip)."""
    w, h = img.size
    bilinear = Image.Resampling.BILINEAR
    return img.resize((w // 2, h // 2), bilinear).resize((w, h), bilinear)


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "clean": lambda im: im,
    "jpeg90": _jpeg90,
    "down_up": _down_up,
}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_outline_detector_accuracy(size: int, transform: str) -> None:
    """200 plain + 200 outlined random scenes: accuracy >= 0.98 (measured: 1.0 in every setting)."""
    rng = np.random.default_rng(size * 7 + len(transform))
    fn = TRANSFORMS[transform]
    scorer = OutlineStyleScorer()
    plain = [fn(sample_toy_scene(rng, size, outline=False).image) for _ in range(200)]
    outlined = [fn(sample_toy_scene(rng, size, outline=True).image) for _ in range(200)]
    correct = (~scorer.detect(plain)).sum() + scorer.detect(outlined).sum()
    accuracy = float(correct) / 400
    assert accuracy >= 0.98, f"{size}px {transform}: accuracy {accuracy:.3f}"
    s_plain, s_out = scorer.score(plain), scorer.score(outlined)
    assert float(s_plain.min()) >= 0.0 and float(s_out.max()) <= 1.0
    assert float(s_out.mean()) - float(s_plain.mean()) > 0.7


def test_outline_score_hand_example() -> None:
    """The example of ``outline_style_score``'s docstring: ring -> 1.0 exactly, no ring -> 0.0 exactly."""
    x = np.full((32, 32, 3), 240, dtype=np.uint8)
    x[8:24, 8:24] = 0  # 16x16 black square, 4-px ring once filled
    x[12:20, 12:20] = (200, 50, 50)
    assert outline_width(32) == 4
    assert outline_style_score(x) == 1.0
    x[8:24, 8:24] = (200, 50, 50)
    assert outline_style_score(x) == 0.0


def test_outline_rejects_dark_blob_and_dark_image() -> None:
    """Step 5 (interior darkness) and step 6 (dark background) of the definition."""
    blob = np.full((64, 64, 3), 235, dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    blob[(yy - 32) ** 2 + (xx - 32) ** 2 <= 20**2] = 10  # filled near-black disc
    assert outline_style_score(blob) < 0.1
    dark = np.full((64, 64, 3), 20, dtype=np.uint8)
    dark[20:44, 20:44] = (200, 50, 50)
    assert outline_style_score(dark) == 0.0
    assert outline_style_score(np.full((32, 32, 3), 240, dtype=np.uint8)) == 0.0  # empty scene


def test_outline_threshold_validation() -> None:
    with pytest.raises(ValueError, match="threshold"):
        OutlineStyleScorer(threshold=1.5)
    with pytest.raises(ValueError, match="RGB"):
        outline_style_score(np.zeros((32, 32)))


def test_toy_world_is_deterministic_and_validated() -> None:
    a = draw_toy_image("triangle", TOY_COLORS["red"], True, 32, np.random.default_rng(7))
    b = draw_toy_image("triangle", TOY_COLORS["red"], True, 32, np.random.default_rng(7))
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="too dark"):
        draw_toy_image("circle", (20, 20, 20), False, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too close to the light background"):
        draw_toy_image("circle", (230, 230, 230), False, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape must be one of"):
        draw_toy_image("star", TOY_COLORS["red"], False, 32, np.random.default_rng(0))  # type: ignore[arg-type]
    scene = sample_toy_scene(np.random.default_rng(1), 64, outline=True)
    assert scene.shape in SHAPES and scene.caption == f"a {scene.color_name} {scene.shape}"


def test_brightness_hand_values() -> None:
    """All-white -> 1; top half black, bottom half white -> 0.5."""
    half = np.zeros((8, 8, 3), dtype=np.uint8)
    half[4:] = 255
    got = BrightnessScorer().score([Image.new("RGB", (8, 8), (255, 255, 255)), Image.fromarray(half)])
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5]))


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------


def test_build_scorer_builds_every_name(clip_dir: Path, head_path: Path) -> None:
    specs = {
        "clip": {"name": "clip", "model_dir": str(clip_dir), "batch_size": 2},
        "pickscore": {"name": "pickscore", "model_dir": str(clip_dir), "processor_dir": str(clip_dir)},
        "aesthetic": {"name": "aesthetic", "clip_dir": str(clip_dir), "head_path": str(head_path)},
        "outline_style": "outline_style",
        "brightness": {"name": "brightness"},
        "color_accuracy": "color_accuracy",
        "shape_accuracy": {"name": "shape_accuracy"},
    }
    assert set(specs) == set(rewards.SCORERS)
    for name, spec in specs.items():
        scorer = build_scorer(spec)
        assert isinstance(scorer, Scorer) and scorer.name == name


def test_build_scorer_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"valid names: \['aesthetic', 'brightness', 'clip', 'color_accuracy', 'outline_style'",
    ):
        build_scorer("hpsv2")
    with pytest.raises(ValueError, match=r"unknown keys \['model'\]; valid keys"):
        build_scorer({"name": "clip", "model": "x"})
    with pytest.raises(FileNotFoundError, match="needs 'model_dir'"):
        build_scorer("clip")
    with pytest.raises(FileNotFoundError, match="needs 'head_path'"):
        build_scorer({"name": "aesthetic", "clip_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"model_dir=.* is not a directory"):
        build_scorer({"name": "pickscore", "model_dir": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="holds none of"):
        build_scorer({"name": "clip", "model_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="dtype must be"):
        clip_scorers._resolve_dtype("fp8")


def test_pickscore_processor_dir_hint(clip_dir: Path, tmp_path: Path) -> None:
    """A PickScore model dir without processor files asks for processor_dir."""
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"pass processor_dir=.*laion/CLIP-ViT-H-14"):
        PickScoreScorer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"processor_dir=.* holds none of"):
        PickScoreScorer(clip_dir, processor_dir=tmp_path)


def test_modules_import_neither_ray_mlflow_nor_transformers_eagerly() -> None:
    """No ray/mlflow anywhere; transformers only inside functions (toy scorers must stay cheap to import)."""
    root = Path(__file__).resolve().parents[1] / "pipelines"
    for name in ("rewards.py", "scoring.py", "clip_scorers.py", "fidelity.py", "shapes.py", "toy_world.py"):
        tree = ast.parse((root / name).read_text())
        every = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]

        def roots(nodes: list[ast.stmt]) -> set[str]:
            out = set()
            for n in nodes:
                mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                out |= {m.split(".")[0] for m in mods}
            return out

        assert not roots(every) & {"ray", "mlflow"}, name
        assert "transformers" not in roots(top), name
