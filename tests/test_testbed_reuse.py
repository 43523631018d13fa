"""The testbed reuses a finished training run while its fingerprint (resolved config, bytes of the files that
extra overrides name) matches, and trains afresh -- from step 0, in a new MLflow run -- when it does not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.toy_style import runs
from benchmarks.toy_style.methods import Budget, select_methods
from pipelines.toy_base_asset import shipped_base

HP = {"lr": 5e-5, "beta": 1000.0}


@pytest.fixture
def fake_training(monkeypatch):
    """``run_training`` replaced by a recorder of (whether a checkpoint was there when it started); it leaves a
    checkpoint in the run's workdir and reports loss = the number of trainings so far."""
    calls: list[bool] = []

    def run_training(cfg):
        checkpoint = cfg.workdir / "ray_results" / "step_120"
        calls.append(checkpoint.exists())
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text("state")
        return SimpleNamespace(
            export_dir="export", final_metrics={"loss": float(len(calls))}, mlflow_run_id=None
        )

    monkeypatch.setattr("ray_jobs.training.driver.run_training", run_training)
    return calls


def _train(workdir, hparams):
    return runs.train(workdir, shipped_base(), select_methods(("B_dpo",))[0], 0, Budget(), hparams=hparams)


def test_same_config_twice_trains_once(tmp_path, fake_training):
    """The second call returns the first result (loss 1.0), marked reused, without training."""
    first = _train(tmp_path, HP)
    second = _train(tmp_path, HP)
    assert fake_training == [False]
    assert second == {**first, "reused": True}


def test_changed_hyperparameters_train_afresh_without_the_old_checkpoint(tmp_path, fake_training):
    """β 1000 then β 2000 under the same run name: the second training starts with no checkpoint of the
    first in its workdir (it cannot resume the old state) and its result (loss 2.0) is the one returned."""
    _train(tmp_path, HP)
    result = _train(tmp_path, {**HP, "beta": 2000.0})
    assert fake_training == [False, False]
    assert result["final"] == {"loss": 2.0}


def test_fingerprint_holds_the_bytes_of_a_file_an_extra_override_names(tmp_path):
    """Same config, same override text: rewriting the named file (a new calibration) changes the fingerprint;
    writing the same bytes back restores it."""
    cfg = runs.train_config(tmp_path, shipped_base(), select_methods(("B_dpo",))[0], 0, Budget(), hparams=HP)
    named = tmp_path / "calibration.json"
    named.write_text('{"bins": [1.0, 2.0]}')
    extra = (f"loss.timestep_weight_calibration={named}",)
    before = runs.run_fingerprint(cfg, extra)
    named.write_text('{"bins": [1.0, 3.0]}')
    assert runs.run_fingerprint(cfg, extra) != before
    named.write_text('{"bins": [1.0, 2.0]}')
    assert runs.run_fingerprint(cfg, extra) == before


def test_changed_training_code_trains_afresh(tmp_path, fake_training, monkeypatch):
    """The same config after the training code changed (``code_digest`` differs): trained again."""
    monkeypatch.setattr(runs, "code_digest", lambda: "before")
    _train(tmp_path, HP)
    monkeypatch.setattr(runs, "code_digest", lambda: "after")
    _train(tmp_path, HP)
    assert fake_training == [False, False]


def test_code_digest_follows_the_sources_only(tmp_path):
    """A tree with ``prefopt_core/a.py``: editing it changes the digest, adding a non-``.py`` file does not."""
    for package in runs.TRAINING_CODE:
        (tmp_path / package).mkdir()
    source = tmp_path / "prefopt_core" / "a.py"
    source.write_text("x = 1\n")
    before = runs.code_digest(tmp_path)
    (tmp_path / "ray_jobs" / "notes.md").write_text("not code")
    assert runs.code_digest(tmp_path) == before
    source.write_text("x = 2\n")
    assert runs.code_digest(tmp_path) != before
