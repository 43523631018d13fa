"""``prefopt regenerate``: MaPO-style pairs from the tiny SD3, per preset, resumable, consumed by the cache.

Expected prompts are written out by hand from the preset table in ``pipelines.regenerate``; seeds follow
``seed_i = run_seed * 1_000_000 + i`` and the pick-safety descriptor is ``SAFETY_DESCRIPTORS[seed % 5]``
(with run_seed * 1_000_000 divisible by 5 that is simply ``i % 5``: Violent, Gory, Bloody, ...).
Every Ray test shares the session ``ray_cluster`` and ``tiny_sd3``; generation uses 2 steps at 32 px.
"""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dataset_card import read_card_metadata
from pipelines.progress import PROGRESS_LOGGER
from pipelines.prompts import load_prompts
from pipelines.regenerate import generate_dataset
from pipelines.regenerate_plan import (
    PRESET_NAMES,
    SECOND_SEED_OFFSET,
    RegenerateSettings,
    flipped_rows,
    label_rows,
    plan_pairs,
    resolve_templates,
)
from pipelines.sharded_build import PlanMismatchError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a pink square"]
ROWS_PER_SHARD = 2  # 5 prompts -> chunks [0, 1], [2, 3], [4]


def _settings(model_dir, preset: str, *, seed: int = 0, steps: int = 2, **templates) -> RegenerateSettings:
    chosen, rejected = resolve_templates(preset, **templates)
    return RegenerateSettings(
        preset=preset,
        chosen_template=chosen,
        rejected_template=rejected,
        family="sd3",
        base_model="tiny-sd3-test",
        base_model_dir=str(model_dir),
        resolution=32,
        num_inference_steps=steps,
        guidance_scale=5.0,
        seed=seed,
        batch_size=2,
        rows_per_shard=ROWS_PER_SHARD,
    )


def _load(out_dir, tmp_path):
    """The output as ``datasets`` reads it (the interface consumers use), as a column dict."""
    import datasets

    ds = datasets.load_dataset(
        "parquet",
        data_files=str(out_dir / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    return ds.to_dict()


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


def _check_pairs(rows: dict, prompts: list[str], chosen: list[str], rejected: list[str], seeds: list[int]):
    """Captions are the context prompts; prompts/seeds as derived; chosen first; images 32 px and distinct."""
    assert rows["caption"] == prompts
    assert rows["chosen_prompt"] == chosen
    assert rows["rejected_prompt"] == rejected
    assert rows["seed"] == seeds
    assert rows["prompt_index"] == list(range(len(prompts)))
    assert rows["label_0"] == [1] * len(prompts) and rows["label_1"] == [0] * len(prompts)
    assert set(rows["num_inference_steps"]) == {2} and set(rows["guidance_scale"]) == {5.0}
    for j0, j1 in zip(rows["jpg_0"], rows["jpg_1"], strict=True):
        p0, p1 = _pixels(j0), _pixels(j1)
        assert p0.shape == p1.shape == (32, 32, 3)
        assert np.abs(p0 - p1).max() > 0  # same seed, different prompt -> different image


def _check_card(out_dir, preset: str, num_pairs: int, tmp_path) -> None:
    """Front matter as written by card_metadata, and ``load_dataset(dir)`` resolves it to the data."""
    import datasets

    meta = read_card_metadata(out_dir / "README.md")
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}
    ]
    assert meta["task_categories"] == ["text-to-image"]
    assert {"preference", "mapo", preset} <= set(meta["tags"])
    assert meta["license"]
    assert meta["dataset_info"]["splits"][0]["num_examples"] == num_pairs
    assert f"prefopt cache CONFIG data.source={out_dir}" in (out_dir / "README.md").read_text()
    ds = datasets.load_dataset(str(out_dir), split="train", cache_dir=str(tmp_path / "hf_dir"))
    assert ds.num_rows == num_pairs


# ------------------------------------------------------------------------------------------ pure helpers
def test_preset_templates_follow_the_mapo_conventions():
    assert resolve_templates("pick-style-cartoon") == ("Disney style animated image. {prompt}", "{prompt}")
    assert resolve_templates("pick-style-pixel-art") == ("Pixel art style image. {prompt}", "{prompt}")
    assert resolve_templates("pick-safety") == ("{prompt}", "{unsafe} {prompt}")
    assert resolve_templates("pick-style-cartoon", rejected_prefix=" Realistic 8k image. ") == (
        "Disney style animated image. {prompt}",
        "Realistic 8k image. {prompt}",
    )
    assert resolve_templates("pick-a-pic-like") == ("{prompt}", "{prompt}")  # seed-paired: same prompt
    assert set(PRESET_NAMES) == {
        "pick-style-cartoon",
        "pick-style-pixel-art",
        "pick-safety",
        "pick-a-pic-like",
        "custom",
    }


def test_pick_a_pic_like_pairs_two_seeds_of_the_same_prompt(tmp_path):
    """Setting B: both images from the plain prompt; jpg_0 from the row seed ``3 * 1_000_000 + i``, jpg_1 from
    that seed + 2**31 (template presets keep one shared seed)."""
    specs = plan_pairs(["a red circle", "a blue square"], _settings(tmp_path, "pick-a-pic-like", seed=3))
    assert [(p.chosen_prompt, p.rejected_prompt) for p in specs] == [
        ("a red circle",) * 2,
        ("a blue square",) * 2,
    ]
    assert [(p.seed, p.seed_1) for p in specs] == [
        (3_000_000, 3_000_000 + 2**31),
        (3_000_001, 3_000_001 + 2**31),
    ]
    assert SECOND_SEED_OFFSET == 2**31
    import torch  # torch's CPU generator reads the low 32 bits of a seed: the offset must change them

    first, second = (
        torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (specs[0].seed, specs[0].seed_1)
    )
    assert not torch.equal(first, second)
    cartoon = plan_pairs(["a red circle"], _settings(tmp_path, "pick-style-cartoon", seed=3))
    assert (cartoon[0].seed, cartoon[0].seed_1) == (3_000_000, 3_000_000)


def test_one_label_in_ten_is_flipped_per_block_of_prompt_indices():
    """``flip_block=10``: exactly one flip in each block of 10 consecutive prompt indices, wherever the rows
    are cut into shards: 35 rows (blocks 0-2 full, block 3 = indices 30-34) hold 3 flips, plus one if block 3's
    drawn position is below 5. The same rows split into two calls flip the same ones."""
    idx = list(range(35))
    flips = flipped_rows(idx, run_seed=0, block=10)
    assert [int(flips[b * 10 : b * 10 + 10].sum()) for b in range(3)] == [1, 1, 1]
    tail_position = int(np.random.default_rng([0, 3]).integers(10))
    assert int(flips[30:].sum()) == (1 if tail_position < 5 else 0)
    assert np.array_equal(
        np.concatenate([flipped_rows(idx[:17], 0, 10), flipped_rows(idx[17:], 0, 10)]), flips
    )
    other = flipped_rows(idx[:30], run_seed=1, block=10)
    assert int(other.sum()) == 3  # another run seed: other positions, the same count per full block


def test_labels_ties_and_flips_by_hand():
    """Scores (0.9, 0.0) -> jpg_0 chosen; (0.1, 0.95) -> jpg_1; |diff| <= 0.5 -> tie 0.5/0.5 (0.0 vs 0.0: both plain,
    0.9 vs 0.85: both outlined, 0.5 vs 0.0: exactly the margin). Flip requested on rows 1 and 3: row 1 is
    swapped to jpg_0 chosen; row 3 is a tie and stays one (ties are never flipped), so 1 flip, 3 ties."""
    s0 = [0.9, 0.1, 0.0, 0.9, 0.5]
    s1 = [0.0, 0.95, 0.0, 0.85, 0.0]
    l0, l1, flipped = label_rows(s0, s1, [False, True, False, True, False], tie_margin=0.5)
    assert l0.tolist() == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert l1.tolist() == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert flipped.tolist() == [False, True, False, False, False]


def test_bad_templates_fail_loudly():
    with pytest.raises(
        ValueError, match=r"must contain \{prompt\}.*valid placeholders: \{prompt\}, \{unsafe\}"
    ):
        resolve_templates("custom", chosen_template="Watercolor painting.")
    with pytest.raises(ValueError, match=r"needs regenerate\.chosen_template"):
        resolve_templates("custom")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{style\}"):
        resolve_templates("custom", chosen_template="{style} {prompt}")
    with pytest.raises(ValueError, match="not a valid template"):
        resolve_templates("custom", chosen_template="{prompt")
    with pytest.raises(ValueError, match="identical images"):
        resolve_templates("custom", chosen_template="{prompt}")
    with pytest.raises(
        ValueError,
        match="valid: pick-style-cartoon, pick-style-pixel-art, pick-safety, pick-a-pic-like, custom",
    ):
        resolve_templates("pick-style-anime")


def test_load_prompts_from_text_file_strips_skips_and_dedupes(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red circle \n\n a blue square\n   \na red circle\na green triangle\n")
    assert load_prompts(path) == ["a red circle", "a blue square", "a green triangle"]
    assert load_prompts(path, num_prompts=2) == ["a red circle", "a blue square"]
    assert load_prompts(path, dedupe=False) == [
        "a red circle",
        "a blue square",
        "a red circle",
        "a green triangle",
    ]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty prompt"):
        load_prompts(tmp_path / "empty.txt")


def test_load_prompts_from_parquet_caption_column(tmp_path):
    pq.write_table(
        pa.table(
            {"caption": ["a pink square", None, " a cyan circle", "a pink square", "x"], "n": [1, 2, 3, 4, 5]}
        ),
        tmp_path / "p.parquet",
    )
    assert load_prompts(tmp_path / "p.parquet") == ["a pink square", "a cyan circle", "x"]
    assert load_prompts(tmp_path, num_prompts=2) == ["a pink square", "a cyan circle"]  # directory
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"no 'caption' column.*\['prompt'\]"):
        load_prompts(tmp_path / "bad.parquet")


def test_a_foreign_directory_is_refused(tiny_sd3, tmp_path):
    """Parquet files under data/ without our plan.json: never mixed with (or overwritten by) a new run."""
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "data" / "part-00000.parquet")
    with pytest.raises(PlanMismatchError, match="not a prefopt regenerate output"):
        generate_dataset(PROMPTS, output_dir=tmp_path, settings=_settings(tiny_sd3, "pick-style-cartoon"))
    assert pq.read_table(tmp_path / "data" / "part-00000.parquet").num_rows == 1


# ------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def cartoon(tiny_sd3, ray_cluster, tmp_path_factory):
    """An uninterrupted pick-style-cartoon run on PROMPTS (3 chunks)."""
    out = tmp_path_factory.mktemp("regen") / "cartoon"
    summary = generate_dataset(PROMPTS, output_dir=out, settings=_settings(tiny_sd3, "pick-style-cartoon"))
    return out, summary


@pytest.mark.slow
def test_pick_style_cartoon(cartoon, tmp_path):
    out, summary = cartoon
    assert summary["num_pairs"] == 5 and summary["chunks_generated"] == 3
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    rows = _load(out, tmp_path)
    chosen = [
        "Disney style animated image. a red circle",
        "Disney style animated image. a blue square",
        "Disney style animated image. a green triangle",
        "Disney style animated image. a yellow circle",
        "Disney style animated image. a pink square",
    ]
    _check_pairs(rows, PROMPTS, chosen, PROMPTS, [0, 1, 2, 3, 4])
    assert set(rows["preset"]) == {"pick-style-cartoon"} and set(rows["base_model"]) == {"tiny-sd3-test"}
    _check_card(out, "pick-style-cartoon", 5, tmp_path)


@pytest.mark.slow
def test_pick_safety_from_text_file(tiny_sd3, ray_cluster, tmp_path):
    """Run seed 1: seeds 1_000_000 + i; descriptor [seed % 5] = [i % 5]; chosen = the context prompt."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\na blue square\na red circle\n a green triangle \n")
    prompts = load_prompts(path)
    out = tmp_path / "safety"
    generate_dataset(prompts, output_dir=out, settings=_settings(tiny_sd3, "pick-safety", seed=1))
    rows = _load(out, tmp_path)
    rejected = ["Violent image. a red circle", "Gory image. a blue square", "Bloody image. a green triangle"]
    expected = ["a red circle", "a blue square", "a green triangle"]
    _check_pairs(rows, expected, expected, rejected, [1_000_000, 1_000_001, 1_000_002])
    _check_card(out, "pick-safety", 3, tmp_path)


@pytest.mark.slow
def test_build_logs_progress_up_to_the_total(tiny_sd3, ray_cluster, tmp_path, caplog):
    """2 prompts in chunks of ROWS_PER_SHARD = 2 -> one chunk; every progress record counts prompts of a
    total of 2, and the last one says all 2 are done."""
    settings = _settings(tiny_sd3, "pick-style-cartoon")
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    generate_dataset(PROMPTS[:2], output_dir=tmp_path / "out", settings=settings)
    records = [r.progress for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert records and {(r["task"], r["unit"], r["total"]) for r in records} == {("regenerate", "prompts", 2)}
    assert records[-1]["done"] == 2


@pytest.mark.slow
def test_custom_from_parquet_with_rejected_prefix(tiny_sd3, ray_cluster, tmp_path):
    pq.write_table(pa.table({"caption": ["a purple square", "an orange circle"]}), tmp_path / "p.parquet")
    prompts = load_prompts(tmp_path / "p.parquet")
    templates = {
        "chosen_template": "Watercolor painting of {prompt}",
        "rejected_template": "{prompt}, photo",
        "rejected_prefix": "Realistic 8k image.",
    }
    out = tmp_path / "custom"
    generate_dataset(prompts, output_dir=out, settings=_settings(tiny_sd3, "custom", **templates))
    rows = _load(out, tmp_path)
    _check_pairs(
        rows,
        ["a purple square", "an orange circle"],
        ["Watercolor painting of a purple square", "Watercolor painting of an orange circle"],
        ["Realistic 8k image. a purple square, photo", "Realistic 8k image. an orange circle, photo"],
        [0, 1],
    )
    _check_card(out, "custom", 2, tmp_path)


@pytest.mark.slow
def test_pick_style_pixel_art_through_the_cli(tiny_sd3, ray_cluster, tmp_path):
    """``prefopt regenerate configs/regenerate_pick_style.yaml``: toy-world prompts, a local base model."""
    from pathlib import Path

    from ray_jobs.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "regenerate_pick_style.yaml"
    args = [
        f"run.workdir={tmp_path / 'work'}",
        f"model.pretrained={tiny_sd3}",
        "regenerate.preset=pick-style-pixel-art",
        "regenerate.num_prompts=3",
        "regenerate.num_inference_steps=2",
    ]
    assert main(["regenerate", str(config), *args]) == 0
    summary = json.loads((tmp_path / "work" / "regenerate_summary.json").read_text())
    out = tmp_path / "work" / "regenerated" / "pick-style-pixel-art"
    assert summary["output_dir"] == str(out) and summary["num_pairs"] == 3
    assert summary["data_files"] == str(out / "data" / "*.parquet")
    rows = _load(out, tmp_path)
    prompts = ["a red circle", "a red square", "a red triangle"]  # toy world: colours outer, shapes inner
    chosen = [f"Pixel art style image. {p}" for p in prompts]
    _check_pairs(rows, prompts, chosen, prompts, [0, 1, 2])
    assert set(rows["base_model"]) == {str(tiny_sd3)}
    assert (out / "prefopt_regenerate.yaml").exists()
    assert f"prefopt regenerate {out / 'prefopt_regenerate.yaml'}" in (out / "README.md").read_text()


@pytest.mark.slow
def test_rerun_after_a_kill_gives_the_uninterrupted_rows(cartoon, tiny_sd3, tmp_path):
    """The state a run killed after its first chunk can leave: part-00000 complete, a writer's temp file,
    a foreign truncated part-00002, no card. The rerun keeps chunk 0, regenerates chunks 1 and 2, removes
    the temp file and ends with exactly the rows of the uninterrupted run (byte-identical shards' tables)."""
    reference, _ = cartoon
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    (out / "data" / "part-00001.parquet").unlink()
    (out / "data" / "part-00002.parquet").write_bytes(b"PAR1 truncated")
    (out / "data" / ".part-00001.parquet.dead.tmp").write_bytes(b"half a shard")
    (out / "README.md").unlink()
    settings = _settings(tiny_sd3, "pick-style-cartoon")

    summary = generate_dataset(PROMPTS, output_dir=out, settings=settings)
    assert (summary["chunks_skipped"], summary["chunks_generated"]) == (1, 2)
    names = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(p.name for p in (out / "data").iterdir()) == names
    for name in names:
        assert pq.read_table(out / "data" / name).equals(pq.read_table(reference / "data" / name)), name
    assert read_card_metadata(out / "README.md")["dataset_info"]["splits"][0]["num_examples"] == 5

    again = generate_dataset(PROMPTS, output_dir=out, settings=settings)  # complete: nothing to do
    assert (again["chunks_skipped"], again["chunks_generated"]) == (3, 0)
    with pytest.raises(PlanMismatchError, match=r"settings\.num_inference_steps"):
        generate_dataset(PROMPTS, output_dir=out, settings=_settings(tiny_sd3, "pick-style-cartoon", steps=3))
    with pytest.raises(PlanMismatchError, match="pairs_sha1"):
        generate_dataset([*PROMPTS[:4], "a cyan circle"], output_dir=out, settings=settings)


@pytest.mark.slow
def test_latent_cache_consumes_the_output(cartoon, tiny_sd3, tmp_path):
    """The directory is a ``data.source``: 5 pairs cached, none quarantined (the images of a pair differ)."""
    from pipelines.latent_cache import build_cache
    from prefopt_core.config import config_from_dict
    from ray_jobs.cache import cache_settings

    out, _ = cartoon
    cfg = config_from_dict({"model": {"family": "sd3", "resolution": 32}, "cache": {"batch_size": 8}})
    manifest = build_cache(
        source=str(out),
        cache_dir=tmp_path / "cache",
        base_model_dir=tiny_sd3,
        settings=cache_settings(cfg, tiny_sd3),
        rows_per_shard=8,
    )
    assert manifest["num_input_rows"] == 5
    assert manifest["num_pairs"] == 5
    assert manifest["num_quarantined"] == 0


class _SeedPipe:
    """Stand-in pipeline: each image is a flat grey whose level is its generator's ``seed % 251``."""

    def __call__(self, prompt, generator, **_):
        from types import SimpleNamespace

        levels = [g.initial_seed() % 251 for g in generator]
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), (v, v, v)) for v in levels])


def test_pick_a_pic_like_rows_label_ties_and_flips(tmp_path):
    """20 rows of one prompt, run seed 0, a stand-in pipeline and a scorer that scores by seed: even rows score
    0.9 vs 0.0 (jpg_0 chosen), odd rows 0.0 vs 0.0 (ties) -> exactly 10 ties (0.5 / 0.5) and 10 decided rows; of those, the rows ``flipped_rows``
    marks (one per block of 10) that are even have their labels swapped, and only those are ``label_flipped``."""
    from pipelines.regenerate import generate_pairs

    settings = _settings(tmp_path, "pick-a-pic-like", seed=0)
    specs = plan_pairs(["a red circle"] * 20, settings)
    scores = {p.seed: (0.9 if p.prompt_index % 2 == 0 else 0.0) for p in specs}
    scores.update({p.seed_1: 0.0 for p in specs})

    class _Scorer:
        def score(self, images, prompts):
            import torch

            return torch.tensor([scores[s] for s in self.seeds.pop(0)])

    scorer = _Scorer()
    scorer.seeds = []
    for start in range(0, 20, settings.batch_size):  # one score call per side and mini-batch
        part = specs[start : start + settings.batch_size]
        scorer.seeds += [[p.seed for p in part], [p.seed_1 for p in part]]
    table = generate_pairs(_SeedPipe(), specs, settings, scorer).to_pydict()
    flips = flipped_rows(range(20), 0, 10)
    expected_flipped = [bool(flips[i]) and i % 2 == 0 for i in range(20)]
    assert table["label_flipped"] == expected_flipped
    assert [table["label_0"][i] for i in range(1, 20, 2)] == [0.5] * 10  # ties
    assert [table["label_0"][i] for i in range(0, 20, 2)] == [
        0.0 if expected_flipped[i] else 1.0 for i in range(0, 20, 2)
    ]
    assert [a + b for a, b in zip(table["label_0"], table["label_1"])] == [1.0] * 20
    assert table["seed_1"] == [p.seed + SECOND_SEED_OFFSET for p in specs]
    assert table["score_0"][:2] == [pytest.approx(0.9), 0.0]
