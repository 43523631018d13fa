"""Online preference rounds: sampled latents go into the cache untouched, the pairing rule, the manifest,
resume, and one ``prefopt online`` round end to end with nested MLflow runs.

Setup shared by the Ray tests (session ``tiny_sd3`` + ``ray_cluster``): 5 prompts x 3 samples, 2 denoising
steps at 32 px (latents ``(4, 16, 16)``), the ``brightness`` scorer (continuous, so samples of a prompt
essentially never tie), ``rows_per_shard = 2``: chunks ``[0, 1]``, ``[2, 3]``, ``[4]``. Sample ``k`` of prompt
``i`` in round 0 of run seed 0 has seed ``i * 1000 + k`` (``sample_seed``). Run:
``.venv/bin/pytest tests/test_online.py -q``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.latent_cache import (
    CacheMismatchError,
    check_cache_matches,
    model_fingerprint,
    pair_key,
    read_manifest,
)
from pipelines.online import OnlineSettings, generate_online_cache, pair_best_worst, sample_seed
from pipelines.rewards import BrightnessScorer
from pipelines.sharded_build import PlanMismatchError
from prefopt_core.config import ConfigError, load_config
from prefopt_core.models.sd3 import SD3Adapter

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a pink square"]
K = 3
STEPS = 2
RES = 32


def _settings(model_dir: Path, *, min_margin: float = 0.0) -> OnlineSettings:
    return OnlineSettings(
        family="sd3",
        base_model_dir=str(model_dir),
        policy=None,
        round=0,
        resolution=RES,
        samples_per_prompt=K,
        min_margin=min_margin,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        seed=0,
        scorer={"name": "brightness"},
        batch_size=2,
        rows_per_shard=2,
    )


def _rows(cache_dir: Path, kind: str) -> list[dict]:
    files = sorted((cache_dir / kind).glob("f*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


@pytest.fixture(scope="module")
def round0(tmp_path_factory, tiny_sd3, ray_cluster):
    """Round 0 from the base model with min_margin 0: ``(cache_dir, manifest)``."""
    cache_dir = tmp_path_factory.mktemp("online") / "cache"
    manifest = generate_online_cache(PROMPTS, cache_dir=cache_dir, settings=_settings(tiny_sd3))
    return cache_dir, manifest


# ------------------------------------------------------------------------------------------- pure rules
def test_sample_seed_formula_and_bounds():
    """``((s * 1000 + r) * 10**6 + i) * 1000 + k``: (0, 0, 1, 1) -> 1001; (2, 1, 0, 3) -> 2001 * 10**9 + 3."""
    assert sample_seed(0, 0, 1, 1) == 1001
    assert sample_seed(2, 1, 0, 3) == 2_001_000_000_003
    assert sample_seed(0, 0, 999_999, 999) == 999_999_999
    for args in [(0, 0, 0, 1000), (0, 0, 10**6, 0), (0, 1000, 0, 0), (-1, 0, 0, 0)]:
        with pytest.raises(ValueError, match="must be in"):
            sample_seed(*args)


def test_pairing_rule_hand_example():
    """Scores (dyadic, so differences are exact), min_margin 0.5; best = first argmax, worst = first argmin
    over finite scores, kept iff best - worst > 0.5:

    row 0  [0.25, 1.0, 0.5]     best 1, worst 0, margin 0.75 > 0.5       -> kept
    row 1  [0.5, 0.75, 0.625]   best 1, worst 0, margin 0.25             -> margin_below_threshold
    row 2  [0.25, 0.75, 0.25]   best 1, worst 0 (first of two minima), margin 0.5, not > 0.5 (strict) -> skipped
    row 3  [nan, 0.125, 1.0]    sample 0 unusable: best 2, worst 1, margin 0.875 -> kept
    row 4  [nan, inf, 0.5]      one finite score                          -> nonfinite_samples
    row 5  [1.0, 0.0, 1.0]      best 0 (first of two maxima), worst 1, margin 1.0 -> kept
    With min_margin 0, identical scores [0.5, 0.5, 0.5] give best = worst = 0, margin 0 -> skipped.
    """
    nan, inf = math.nan, math.inf
    scores = np.array(
        [
            [0.25, 1.0, 0.5],
            [0.5, 0.75, 0.625],
            [0.25, 0.75, 0.25],
            [nan, 0.125, 1.0],
            [nan, inf, 0.5],
            [1.0, 0.0, 1.0],
        ]
    )
    got = [(c.best, c.worst, c.margin, c.kept, c.reason) for c in pair_best_worst(scores, 0.5)]
    assert got[:4] == [
        (1, 0, 0.75, True, "kept"),
        (1, 0, 0.25, False, "margin_below_threshold"),
        (1, 0, 0.5, False, "margin_below_threshold"),
        (2, 1, 0.875, True, "kept"),
    ]
    assert got[4][:2] == (-1, -1) and math.isnan(got[4][2]) and got[4][3:] == (False, "nonfinite_samples")
    assert got[5] == (0, 1, 1.0, True, "kept")
    (tie,) = pair_best_worst(np.array([[0.5, 0.5, 0.5]]), 0.0)
    assert (tie.best, tie.worst, tie.margin, tie.kept) == (0, 0, 0.0, False)
    with pytest.raises(ValueError, match="K >= 2"):
        pair_best_worst(np.array([[1.0]]), 0.0)


def test_settings_refuse_bad_values(tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        replace(_settings(tmp_path), samples_per_prompt=1)
    with pytest.raises(ValueError, match="min_margin"):
        replace(_settings(tmp_path), min_margin=-0.1)
    with pytest.raises(FileNotFoundError, match="not an exported denoiser directory"):
        replace(_settings(tmp_path), policy=str(tmp_path))


# ------------------------------------------------------------------------------------------- one round
def test_cache_rows_are_the_sampled_latents(round0, tiny_sd3):
    """Every kept row's latents equal a fresh single-image ``output_type="latent"`` call with its recorded
    seed (the actor sampled them 6 per batch: equal up to batched-matmul float noise, within 1e-3), its
    scores are the brightness of what ``output_type="pil"`` returns for that seed, and a decode -> re-encode
    round trip would have given visibly different latents (so the comparison can tell the two apart)."""
    cache_dir, manifest = round0
    adapter = SD3Adapter(tiny_sd3)
    pipe = adapter.pipeline()
    scorer = BrightnessScorer()
    rows = _rows(cache_dir, "shards")
    assert len(rows) == manifest["num_pairs"] >= 3  # brightness of 3 distinct samples essentially never ties

    def generate(caption: str, seed: int, output_type: str):
        return pipe(
            prompt=caption,
            height=RES,
            width=RES,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type=output_type,
            max_sequence_length=256,
        ).images

    for row in rows[:2]:
        i = row["row_index"]
        assert row["seeds"] == [sample_seed(0, 0, i, k) for k in range(K)] == [i * 1000 + k for k in range(K)]
        for side in ("w", "l"):
            seed = row[f"seed_{side}"]
            stored = torch.tensor(row[f"latents_{side}"]).view(1, 4, 16, 16)
            fresh = generate(row["caption"], seed, "latent")  # (1, 4, 16, 16)
            # The actor sampled 6 per batch, this call 1: other CPU kernels, equal only up to float noise, which
            # grows through the sampling steps and differs between instruction sets; 1e-3 stays far above it and
            # far below the O(1) gap to another seed's or caption's latents.
            torch.testing.assert_close(stored, fresh, atol=1e-3, rtol=0.0)
            image = generate(row["caption"], seed, "pil")
            score = float(scorer.score(image, [row["caption"]])[0])
            assert row[f"score_{side}"] == pytest.approx(score, abs=2e-3)
            assert row["scores"][row["seeds"].index(seed)] == row[f"score_{side}"]
            pixels = pipe.image_processor.preprocess(image)  # (1, 3, R, R) in [-1, 1]
            assert (adapter.encode_images(pixels) - stored).abs().max() > 1e-2
        assert row["score_w"] == max(row["scores"]) and row["score_l"] == min(row["scores"])


def test_decode_inverts_encode_images_convention(tiny_sd3):
    """``encode_images`` stores ``(mean - shift) * scale``; the pipeline decodes ``z / scale + shift``, so
    decoding ``encode_images(x)`` must equal decoding the raw posterior mean of ``x`` (shift 0.0609 and
    scale 1.5035 of the tiny VAE are both far from identity, so a wrong convention fails)."""
    adapter = SD3Adapter(tiny_sd3)
    vae = adapter.pipeline().vae
    x = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = adapter.encode_images(x)
    raw = vae.encode(x).latent_dist.mean
    with torch.no_grad():
        ours = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        direct = vae.decode(raw).sample
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)


def test_manifest_is_a_latent_cache_for_the_model(round0, tiny_sd3):
    """The keys ``build_cache`` writes, the model fingerprint training checks (accepted by
    check_cache_matches, refused at another resolution), training can batch the rows, and every prompt is
    kept or skipped."""
    from pipelines.cache_reader import batch_from_table

    cache_dir, _ = round0
    manifest = read_manifest(cache_dir)
    build_cache_keys = {
        "format", "fingerprint", "fingerprint_hash", "source", "num_fragments", "num_input_rows",
        "num_pairs", "num_quarantined", "quarantine", "files", "quarantine_files", "columns",
        "build_seconds", "rows_per_s",
    }  # fmt: skip
    assert build_cache_keys <= set(manifest)
    assert set(manifest["fingerprint"]) == {
        "format", "settings", "encoders", "resolution", "fragments", "num_fragments",
    }  # fmt: skip
    encoders = model_fingerprint(SD3Adapter(tiny_sd3))  # what run_training compares
    check_cache_matches(manifest, encoders, RES, cache_dir)
    with pytest.raises(CacheMismatchError, match="resolution"):
        check_cache_matches(manifest, encoders, 64, cache_dir)
    assert manifest["num_fragments"] == 3 and manifest["num_input_rows"] == 5
    assert manifest["num_pairs"] + manifest["num_skipped"] == 5
    assert manifest["online"]["pairs_kept"] == manifest["num_pairs"]
    assert manifest["columns"] == {
        "latents_w": [4, 16, 16],
        "latents_l": [4, 16, 16],
        "prompt_embeds": manifest["columns"]["prompt_embeds"],
        "pooled_prompt_embeds": [64],
        "original_size_w": [2],
        "original_size_l": [2],
        "crop_top_left": [2],
        "crop_top_left_l": [2],
    }
    table = pq.read_table(cache_dir / manifest["files"][0])
    batch = batch_from_table(table, manifest["columns"])
    assert batch.latents_w.shape == (table.num_rows, 4, 16, 16)
    assert set(batch.cond) == {"prompt_embeds", "pooled_prompt_embeds"} and not batch.cond_w
    row = table.to_pylist()[0]
    assert row["pair_id"] == f"online-r0:{row['row_index']}" and row["pair_key"] == pair_key(row["pair_id"])
    assert (row["label_w"], row["label_l"], row["is_tie"], row["swapped"], row["round"]) == (
        1.0,
        0.0,
        False,
        False,
        0,
    )
    assert row["original_size_w"] == row["original_size_l"] == [RES, RES]
    assert row["crop_top_left"] == row["crop_top_left_l"] == [0, 0]
    chosen = [r["score_w"] for r in _rows(cache_dir, "shards")]
    assert manifest["online"]["score_chosen_mean"] == pytest.approx(np.mean(chosen))


def test_margin_threshold_splits_kept_and_skipped(round0, tmp_path, tiny_sd3):
    """With min_margin = the median m of round 0's five margins, the prompts with margin > m are kept and
    the others (the median's own prompt included: strict) skipped, with their scores and seeds. The
    sampler is a plain class: run in-process on the same chunks, it reproduces round 0's scores."""
    from dataclasses import asdict

    from pipelines.online import OnlineSampler

    cache0, _ = round0
    margins = {r["row_index"]: r["score_w"] - r["score_l"] for r in _rows(cache0, "shards")}
    margins.update({r["row_index"]: r["margin"] for r in _rows(cache0, "skipped")})
    m = float(np.median(list(margins.values())))
    sampler = OnlineSampler(asdict(_settings(tiny_sd3, min_margin=m)), str(tmp_path))
    for chunk, start in enumerate(range(0, len(PROMPTS), 2)):
        sampler.write_chunk(chunk, start, PROMPTS[start : start + 2])
    kept, skipped = _rows(tmp_path, "shards"), _rows(tmp_path, "skipped")
    assert sorted(r["row_index"] for r in kept) == sorted(i for i, v in margins.items() if v > m)
    assert sorted(r["row_index"] for r in skipped) == sorted(i for i, v in margins.items() if v <= m)
    assert (len(kept), len(skipped)) == (2, 3)
    for r in skipped:
        assert r["reason"] == "margin_below_threshold" and r["margin"] == margins[r["row_index"]]
        assert r["score_best"] == max(r["scores"]) and r["score_worst"] == min(r["scores"])
        assert r["seeds"] == [r["row_index"] * 1000 + k for k in range(K)]
        assert r["seed_best"] == r["seeds"][r["scores"].index(r["score_best"])]


def test_resume_samples_only_incomplete_chunks(round0, tmp_path, tiny_sd3):
    """A copy of round 0's cache with one file of chunk 1 deleted (a run killed between its two writes, or
    before) has chunk 1 incomplete: the rerun samples chunk 1 only, leaves the files of chunks 0 and 2
    untouched and ends with the same rows. Other settings on the same directory are refused."""
    import shutil

    cache0, manifest0 = round0
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    rows_before = {kind: _rows(cache, kind) for kind in ("shards", "skipped")}
    before = {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in cache.rglob("f*.parquet")}
    (cache / "manifest.json").unlink()
    sorted(cache.rglob("f000001-*.parquet"))[0].unlink()
    settings = _settings(tiny_sd3)
    manifest = generate_online_cache(PROMPTS, cache_dir=cache, settings=settings)
    assert (manifest["chunks_generated"], manifest["chunks_skipped"]) == (1, 2)
    after = {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in cache.rglob("f*.parquet")}
    untouched = [f for f in before if not f.name.startswith("f000001")]
    assert untouched and all(after[f] == before[f] for f in untouched)
    assert sorted(after) == sorted(before)
    assert {kind: _rows(cache, kind) for kind in ("shards", "skipped")} == rows_before
    assert manifest["files"] == manifest0["files"] and manifest["num_pairs"] == manifest0["num_pairs"]
    with pytest.raises(PlanMismatchError, match="min_margin"):
        generate_online_cache(PROMPTS, cache_dir=cache, settings=replace(settings, min_margin=0.5))


# ------------------------------------------------------------------------------------------- the loop
def _online_config(workdir: Path, model_dir: Path, *extra: str):
    return load_config(
        None,
        [
            "run.name=onl",
            f"run.workdir={workdir}",
            f"model.pretrained={model_dir}",
            f"model.resolution={RES}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "tracking.experiment=online-test",
            "online.rounds=1",
            "online.num_prompts=2",
            "online.samples_per_prompt=2",
            "online.steps_per_round=2",
            f"online.num_inference_steps={STEPS}",
            "online.scorer={name: brightness}",
            "loss.name=dpo",
            "loss.beta=500",
            "reference.strategy=periodic",
            "reference.tau=1",
            "train.batch_size=1",
            "train.num_workers=1",
            "train.lr=1e-4",
            "train.sample_prompts=0",
            "eval.seeds=[0]",
            "eval.num_prompts=2",
            f"eval.num_inference_steps={STEPS}",
            "eval.scorers=[{name: brightness}]",
            *extra,
        ],
    )


def test_round_config_chains_policies(tmp_path):
    """Round 1 trains from round 0's export: init_denoiser (policy and reference), its own name, workdir
    and cache, steps_per_round steps, the parent's MLflow store; the eval compares it with the base."""
    from ray_jobs.online_loop import eval_config, round_config

    cfg = _online_config(tmp_path / "w", tmp_path / "base", "train.max_steps=50")
    export = str(tmp_path / "w/online/round_000/export/transformer")
    rc = round_config(cfg, 1, tmp_path / "base", export)
    assert (rc.run.name, rc.model.init_denoiser, rc.model.pretrained) == (
        "onl-r1",
        export,
        str(tmp_path / "base"),
    )
    assert rc.workdir == tmp_path / "w/online/round_001" and rc.cache_dir == rc.workdir / "cache"
    assert (rc.train.max_steps, rc.train.export, rc.tracking_uri) == (2, True, cfg.tracking_uri)
    assert round_config(cfg, 0, tmp_path / "base", None).model.init_denoiser is None
    ec = eval_config(rc, export, tmp_path / "base")
    assert (ec.eval.models, ec.eval.baseline) == ([f"policy={export}"], str(tmp_path / "base"))
    bad = _online_config(tmp_path / "w", tmp_path / "base", "train.max_steps=50", "train.fail_at_step=5")
    with pytest.raises(ConfigError, match="online round 0"):
        round_config(bad, 0, tmp_path / "base", None)


def test_finished_round_is_reused_only_with_its_config(tmp_path):
    """A round_summary.json written with the same training config is reused (a larger online.rounds is
    allowed); another steps_per_round (train.max_steps of the round) or a missing export is refused."""
    from dataclasses import asdict

    from ray_jobs.online_loop import RoundPaths, RoundResult, load_finished_round, round_config

    cfg = _online_config(tmp_path / "w", tmp_path / "base")
    rc = round_config(cfg, 0, tmp_path / "base", None)
    paths = RoundPaths.of(cfg, 0)
    assert load_finished_round(rc, paths) is None
    export = paths.root / "export/transformer"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    done = RoundResult(
        0, None, str(paths.cache), str(export), "a", "b", "c", {"online/pairs_kept": 2.0}, rc.to_dict()
    )
    paths.summary.write_text(json.dumps(asdict(done)))
    more_rounds = _online_config(tmp_path / "w", tmp_path / "base", "online.rounds=3")
    assert load_finished_round(round_config(more_rounds, 0, tmp_path / "base", None), paths) == done
    longer = _online_config(tmp_path / "w", tmp_path / "base", "online.steps_per_round=3")
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_finished_round(round_config(longer, 0, tmp_path / "base", None), paths)
    (export / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_finished_round(rc, paths)


@pytest.mark.slow
def test_run_online_one_round_nested_mlflow(tmp_path, tiny_sd3, ray_cluster):
    """2 prompts x 2 samples -> train 2 steps -> eval; parent run -> round run -> train + eval runs; a
    rerun skips the finished round (no new run)."""
    from mlflow.tracking import MlflowClient

    from ray_jobs.online_loop import run_online

    cfg = _online_config(tmp_path / "w", tiny_sd3)
    summary = run_online(cfg)
    assert summary["rounds"] == 1 and (Path(summary["exports"][0]) / "config.json").is_file()
    manifest = read_manifest(summary["cache_dirs"][0])
    assert manifest["online"]["policy"] is None  # round 0 samples from the base model

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("online-test")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[summary["mlflow_run_id"]]
    assert parent.data.tags["prefopt.command"] == "online" and "mlflow.parentRunId" not in parent.data.tags
    (round_run,) = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert round_run.data.tags["prefopt.command"] == "online" and round_run.data.tags["prefopt.round"] == "0"
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == round_run.info.run_id]
    assert round_run.info.run_name == "onl-round0"
    assert sorted((r.data.tags["prefopt.command"], r.info.run_name) for r in children) == [
        ("eval", "onl-r0-eval"),
        ("train", "onl-r0"),
    ]
    metrics = round_run.data.metrics
    assert metrics["online/pairs_kept"] == manifest["num_pairs"] >= 1
    assert metrics["online/pairs_kept"] + metrics["online/pairs_skipped"] == 2
    assert 0.0 <= metrics["eval/brightness/win_rate"] <= 1.0 and "train/loss" in metrics
    assert parent.data.metrics["online/pairs_kept"] == metrics["online/pairs_kept"]
    saved = json.loads((tmp_path / "w/online/round_000/round_summary.json").read_text())
    assert saved["export_dir"] == summary["exports"][0]

    again = run_online(cfg)
    assert again["exports"] == summary["exports"] and again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
