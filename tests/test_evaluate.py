"""Tests for ``prefopt eval``: the pure evaluation logic (pipelines.evaluation) and ray_jobs.evaluate.

Win-rate math is checked on hand examples with a deterministic fake pipeline and fake scorer; the whole
command runs once end to end on the tiny SD3 (2 prompts x 2 seeds x 2 steps) against a real sqlite MLflow
store. Run: ``.venv/bin/pytest tests/test_evaluate.py -q``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.evaluation import (
    TOY_EVAL_TEMPLATE,
    generate_images,
    image_grid,
    initial_noise,
    load_prompts,
    score_grid,
    summarize,
    toy_eval_prompts,
    win_matrix,
    win_rates,
)
from pipelines.toy_world import SHAPES, TOY_COLORS
from ray_jobs.evaluate import default_name, resolve_models, scorer_labels


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tiny models gain nothing from intra-op threads, which only stall when the 2 CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- fakes
class FakePipe:
    """A pipeline stand-in: each image is a solid colour whose red channel is ``table[(seed, prompt)]``.

    The seed is read from the generator the caller passes; every call's ``latents`` are recorded so tests can
    check the paired noise. Latent geometry: 4 channels, VAE factor 2.
    """

    vae_scale_factor = 2

    def __init__(self, table: dict[tuple[int, str], int]) -> None:
        self.table = table
        self.transformer = SimpleNamespace(config=SimpleNamespace(in_channels=4))
        self.calls: list[dict] = []

    def __call__(self, *, prompt, height, width, latents, generator, **kwargs):
        seed = generator.initial_seed()
        self.calls.append({"prompt": list(prompt), "seed": seed, "latents": latents.clone(), **kwargs})
        assert latents.shape == (len(prompt), 4, height // 2, width // 2)
        return SimpleNamespace(
            images=[Image.new("RGB", (width, height), (self.table[seed, p], 0, 0)) for p in prompt]
        )


class RedScorer:
    """score = red channel / 255 of the top-left pixel; detect = red >= 200 (a stand-in style detector)."""

    name = "red"

    def score(self, images, prompts):
        assert len(images) == len(prompts)
        return torch.tensor([im.getpixel((0, 0))[0] / 255 for im in images], dtype=torch.float32)

    def detect(self, images):
        return torch.tensor([im.getpixel((0, 0))[0] >= 200 for im in images])


PROMPTS = ["a", "b", "c", "d"]
SEEDS = [0, 1]
# red values per seed row, prompt column
BASE_RED = [[128, 51, 179, 26], [77, 77, 230, 102]]
MODEL_RED = [[153, 51, 26, 26], [77, 204, 240, 0]]


def _table(rows: list[list[int]]) -> dict[tuple[int, str], int]:
    return {(s, p): rows[i][j] for i, s in enumerate(SEEDS) for j, p in enumerate(PROMPTS)}


# ------------------------------------------------------------------------------------------- win rates
def test_win_rate_hand_example_with_ties():
    """Outcomes per (seed, prompt), model vs baseline red values (the scores are red / 255, same order):

    seed 0: 153>128 -> 1, 51=51 -> 0.5, 26<179 -> 0, 26=26 -> 0.5   => 2.0 / 4 = 0.5
    seed 1: 77=77 -> 0.5, 204>77 -> 1, 240>230 -> 1, 0<102 -> 0     => 2.5 / 4 = 0.625
    win rate = 4.5 / 8 = 0.5625; per-seed [0.5, 0.625], mean 0.5625, std |0.5 - 0.5625| = 0.0625.
    Adoption (red >= 200): baseline 230 -> 1/8; model 204, 240 -> 2/8. Mean scores: baseline 870/2040,
    model 777/2040 (sum of reds / (8 * 255)).
    """
    images = {
        name: generate_images(FakePipe(_table(rows)), PROMPTS, SEEDS, resolution=8, num_inference_steps=1)
        for name, rows in (("base", BASE_RED), ("tuned", MODEL_RED))
    }
    scorer = RedScorer()
    scores = {m: {"red": score_grid(scorer, ims, PROMPTS)} for m, ims in images.items()}
    detections = {m: {"red": np.asarray(scorer.detect([i for r in ims for i in r])).reshape(2, 4)}
                  for m, ims in images.items()}  # fmt: skip
    assert win_matrix(scores["tuned"]["red"], scores["base"]["red"]).tolist() == [
        [1.0, 0.5, 0.0, 0.5],
        [0.5, 1.0, 1.0, 0.0],
    ]
    out = summarize(scores, "base", detections)
    tuned = out["tuned"]["red"]
    assert tuned["win_rate"] == 0.5625
    assert tuned["win_rate_per_seed"] == [0.5, 0.625]
    assert tuned["win_rate_seed_mean"] == 0.5625 and tuned["win_rate_seed_std"] == 0.0625
    assert tuned["adoption_rate"] == 0.25 and out["base"]["red"]["adoption_rate"] == 0.125
    assert tuned["mean"] == pytest.approx(777 / 2040, rel=1e-6)
    assert out["base"]["red"]["mean"] == pytest.approx(870 / 2040, rel=1e-6)
    assert "win_rate" not in out["base"]["red"]  # the baseline is not compared with itself


def test_per_seed_win_rates_differ_from_pooled_spread():
    """3 seeds x 2 prompts: the model wins every prompt on seed 0, ties on seed 1, loses on seed 2.

    Per seed [1, 0.5, 0]; pooled win rate 3/6 = 0.5 = their mean; population std
    sqrt(((1-.5)^2 + 0 + (0-.5)^2) / 3) = sqrt(1/6).
    """
    base = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    model = np.array([[0.9, 0.6], [0.5, 0.5], [0.1, 0.4]])
    wr = win_rates(model, base)
    assert wr.per_seed == [1.0, 0.5, 0.0]
    assert wr.win_rate == 0.5 and wr.seed_mean == 0.5
    assert wr.seed_std == pytest.approx(math.sqrt(1 / 6), rel=1e-12)
    assert win_rates(base, base).per_seed == [0.5, 0.5, 0.5]  # all ties
    with pytest.raises(ValueError, match="same shape"):
        win_rates(model, base[:2])


def test_paired_noise_is_the_single_prompt_draw_and_batch_independent():
    """Seed s gives every prompt ``randn((1, 4, 4, 4), generator=Generator().manual_seed(s))`` (8 px / VAE 2),
    whatever the batch size: the pairing across models depends on nothing but (seed, resolution)."""
    table = _table(BASE_RED)
    by_batch = {}
    for batch_size in (1, 3):
        pipe = FakePipe(table)
        generate_images(pipe, PROMPTS, SEEDS, resolution=8, num_inference_steps=1, batch_size=batch_size,
                        call_kwargs={"max_sequence_length": 7})  # fmt: skip
        assert all(c["max_sequence_length"] == 7 for c in pipe.calls)
        by_batch[batch_size] = {
            (c["seed"], p): c["latents"][i] for c in pipe.calls for i, p in enumerate(c["prompt"])
        }
    assert len(by_batch[3]) == 8
    for seed in SEEDS:
        expected = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(initial_noise(FakePipe(table), 8, seed)[0], expected)
        for p in PROMPTS:
            assert torch.equal(by_batch[1][seed, p], expected) and torch.equal(by_batch[3][seed, p], expected)
    with pytest.raises(ValueError, match="multiple of the VAE scale factor 2"):
        initial_noise(FakePipe(table), 9, 0)


# ------------------------------------------------------------------------------------------- prompts
def test_toy_eval_prompts_cover_every_scene_once():
    prompts = toy_eval_prompts()
    assert len(prompts) == len(set(prompts)) == len(SHAPES) * len(TOY_COLORS) == 24
    assert prompts[:2] == ["a red circle on a light background", "a green square on a light background"]
    expected = {TOY_EVAL_TEMPLATE.format(color=c, shape=s) for c in TOY_COLORS for s in SHAPES}
    assert set(prompts) == expected
    assert load_prompts(None, 3) == prompts[:3]


def test_load_prompts_text_and_parquet(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \na cat\nzebra\n")
    assert load_prompts(text) == ["a cat", "a dog", "zebra"]  # blank skipped, stripped, de-duplicated
    assert load_prompts(text, 2) == ["a cat", "a dog"]
    assert load_prompts(text, 10) == ["a cat", "a dog", "zebra"]  # fewer than asked: all, with a warning
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["x", "y", "x", ""], "other": [1, 2, 3, 4]}), parquet)
    assert load_prompts(parquet) == ["x", "y"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["x"]}), bad)
    with pytest.raises(ValueError, match="no 'caption' column; columns: \\['text'\\]"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        load_prompts(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------- grid, names
def test_image_grid_layout():
    """2 models x 3 prompts, cell 64, label width 110, header 3 lines x 12 px + 8 = 44 -> 302 x 172 px;
    the tile of model r, prompt c starts at (110 + 64 c, 44 + 64 r)."""
    colors = {
        "base": [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        "tuned": [(10, 20, 30), (40, 50, 60), (70, 80, 90)],
    }
    rows = {m: [Image.new("RGB", (8, 8), c) for c in cs] for m, cs in colors.items()}
    grid = image_grid(rows, ["p0", "p1", "p2"], cell=64, label_width=110)
    assert grid.size == (110 + 3 * 64, 44 + 2 * 64)
    for r, (_, cs) in enumerate(colors.items()):
        for c, color in enumerate(cs):
            assert grid.getpixel((110 + 64 * c + 32, 44 + 64 * r + 32)) == color
    with pytest.raises(ValueError, match="one per prompt"):
        image_grid(rows, ["p0"])


def _fake_denoiser_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_model_sources_names_and_layouts(tmp_path):
    pipe_dir = tmp_path / "sd3"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text("{}")
    run1 = _fake_denoiser_dir(tmp_path / "run1" / "export" / "transformer")
    _fake_denoiser_dir(tmp_path / "run2" / "export" / "transformer")
    sources = resolve_models(
        [str(run1), str(tmp_path / "run2" / "export"), f"dpo={pipe_dir}", str(pipe_dir), f"base={run1}"],
        "transformer",
    )
    assert [(s.name, s.kind) for s in sources] == [
        ("run1", "denoiser"),
        ("run2", "denoiser"),
        ("dpo", "pipeline"),
        ("sd3", "pipeline"),
        ("base-2", "denoiser"),  # "base" is the baseline's name
    ]
    assert sources[1].path == tmp_path / "run2" / "export" / "transformer"  # export dir -> its denoiser
    assert default_name(run1, "transformer") == "run1"
    with pytest.raises(FileNotFoundError, match=r"model_index\.json.*config\.json.*transformer/config\.json"):
        resolve_models([str(tmp_path)], "transformer")
    assert scorer_labels([{"name": "clip"}, {"name": "outline_style"}, {"name": "clip"}]) == [
        "clip",
        "outline_style",
        "clip-2",
    ]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def eval_run(tiny_sd3, tmp_path_factory) -> dict:
    """``prefopt eval`` on the tiny SD3: base, a perturbed copy of its transformer ("tuned") and the base
    pipeline again ("self"); 2 prompts x 2 seeds x 2 steps; outline_style, brightness and the two fidelity
    scorers."""
    from diffusers import SD3Transformer2DModel

    from ray_jobs.cli import main as cli_main

    work = tmp_path_factory.mktemp("eval_work")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tuned = work / "export" / "transformer"
    transformer.save_pretrained(tuned)
    config = work / "eval.yaml"
    config.write_text(
        f"run: {{name: t, workdir: {work}}}\n"
        f"model: {{family: sd3, pretrained: {tiny_sd3}, resolution: 32}}\n"
        f"tracking: {{uri: 'sqlite:///{work}/mlflow.db', experiment: evaltest}}\n"
        "eval:\n  num_prompts: 2\n  seeds: [0, 1]\n  num_inference_steps: 2\n"
        "  scorers: [{name: outline_style}, {name: brightness}, {name: color_accuracy}, {name: shape_accuracy}]\n"
        f"  models: ['tuned={tuned}', 'self={tiny_sd3}']\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # a sqlite store's default artifact root is ./mlruns of the cwd: keep it in tmp
        assert cli_main(["eval", str(config)]) == 0
    return {"summary": json.loads((work / "eval_summary.json").read_text()), "work": work}


def test_eval_summary_has_all_models_and_self_ties(eval_run):
    """The baseline against itself (same weights, same paired noise) gives identical images, so every
    (seed, prompt) is a tie: win rate exactly 0.5, per seed [0.5, 0.5], equal means."""
    s = eval_run["summary"]
    assert list(s["models"]) == ["base", "tuned", "self"]
    assert s["num_prompts"] == 2 and s["seeds"] == [0, 1]
    assert s["scorers"] == ["outline_style", "brightness", "color_accuracy", "shape_accuracy"]
    m = s["metrics"]
    for scorer in ("outline_style", "brightness"):
        assert m[f"eval/self/{scorer}/win_rate"] == 0.5
        assert s["win_rate_per_seed"][f"self/{scorer}"] == [0.5, 0.5]
        assert m[f"eval/self/{scorer}/mean"] == m[f"eval/base/{scorer}/mean"]
        assert 0.0 <= m[f"eval/tuned/{scorer}/win_rate"] <= 1.0
        assert m[f"eval/tuned/{scorer}/win_rate"] == np.mean(s["win_rate_per_seed"][f"tuned/{scorer}"])
    assert m["eval/tuned/brightness/mean"] != m["eval/base/brightness/mean"]  # perturbed weights, new images
    assert "eval/tuned/outline_style/adoption_rate" in m and "eval/tuned/brightness/adoption_rate" not in m


def test_eval_reports_fidelity_means(eval_run):
    """The fidelity scorers score each of the 2 prompts x 2 seeds 0 or 1, so every model's mean is a multiple of
    1/4 in [0, 1]; "self" draws the base's images, so its means equal the base's. No adoption rate (no detector)."""
    m = eval_run["summary"]["metrics"]
    for scorer in ("color_accuracy", "shape_accuracy"):
        for model in ("base", "tuned", "self"):
            assert m[f"eval/{model}/{scorer}/mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert m[f"eval/self/{scorer}/mean"] == m[f"eval/base/{scorer}/mean"]
        assert f"eval/base/{scorer}/adoption_rate" not in m


def test_eval_results_json_recomputes_win_rates(eval_run):
    """The per-sample scores saved in results.json give back the logged win rates."""
    s = eval_run["summary"]
    results = json.loads(Path(s["results_json"]).read_text())
    assert results["prompts"] == toy_eval_prompts()[:2]
    for scorer in ("outline_style", "brightness"):
        tuned, base = (np.array(results["scores"][m][scorer]) for m in ("tuned", "base"))
        assert tuned.shape == (2, 2)
        assert win_rates(tuned, base).win_rate == s["metrics"][f"eval/tuned/{scorer}/win_rate"]


def test_eval_grid_png(eval_run):
    """3 model rows x 2 prompt columns of 128 px + 110 px labels + 44 px header; base and self rows are equal."""
    with Image.open(eval_run["summary"]["grid"]) as grid:
        assert grid.format == "PNG" and grid.size == (110 + 2 * 128, 44 + 3 * 128)
        base_row = grid.crop((110, 44, 110 + 256, 44 + 128)).tobytes()
        tuned_row = grid.crop((110, 44 + 128, 110 + 256, 44 + 256)).tobytes()
        self_row = grid.crop((110, 44 + 256, 110 + 256, 44 + 384)).tobytes()
    assert base_row == self_row and base_row != tuned_row


def test_eval_mlflow_run(eval_run):
    from mlflow.tracking import MlflowClient

    s = eval_run["summary"]
    client = MlflowClient(tracking_uri=s["mlflow_tracking_uri"])
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t-eval"
    assert run.data.tags["prefopt.command"] == "eval"
    assert client.get_experiment(run.info.experiment_id).name == "evaltest"
    for key, value in s["metrics"].items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-12), key
    history = client.get_metric_history(run.info.run_id, "eval/self/brightness/win_rate_per_seed")
    assert sorted((h.step, h.value) for h in history) == [(0, 0.5), (1, 0.5)]
    assert run.data.params["eval.num_inference_steps"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert artifacts == {"eval/grid.png", "eval/results.json"}
