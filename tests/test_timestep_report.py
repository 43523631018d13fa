"""``prefopt timesteps`` (ray_jobs.timestep_report) and the imbalance figure (benchmarks.toy_style.imbalance):
bin metrics from hand-made histories and a real sqlite MLflow store, the shape table, the PNG."""

from __future__ import annotations

import pytest
import torch

from benchmarks.toy_style.imbalance import bin_table, plot_imbalance, run_bin_metrics
from prefopt_core.config import ConfigError, load_config
from prefopt_core.timestep_weights import read_calibration
from prefopt_core.timesteps import NoiseSchedule
from ray_jobs.cli import main
from ray_jobs.timestep_report import bin_abs_margins, calibrate_from_run, shape_lines

K = 10


def _histories(name: str, values) -> dict[str, list[tuple[int, float]]]:
    """``bins/<name>_k`` logged at steps 10 and 20 with ``values(k)`` = (first, second)."""
    return {f"bins/{name}_{k}": [(10, values(k)[0]), (20, values(k)[1])] for k in range(K)}


# ------------------------------------------------------------------------------------------- calibration
def test_bin_abs_margins_mean_over_history() -> None:
    """bins/abs_margin_k logged as (k + 1, k + 3): the mean over the history is k + 2."""
    means, metric = bin_abs_margins(_histories("abs_margin", lambda k: (k + 1.0, k + 3.0)))
    assert means == pytest.approx([k + 2.0 for k in range(K)]) and metric == "bins/abs_margin"


def test_bin_abs_margins_falls_back_to_abs_margin_mean() -> None:
    """Only bins/margin_k = (-2, 4) logged: the fallback averages |margin| = (2 + 4)/2 = 3 per bin."""
    means, metric = bin_abs_margins(_histories("margin", lambda k: (-2.0, 4.0)))
    assert means == pytest.approx([3.0] * K) and metric.startswith("bins/margin")


def test_bin_abs_margins_names_the_missing_bins() -> None:
    histories = _histories("abs_margin", lambda k: (1.0, 1.0))
    del histories["bins/abs_margin_7"]
    with pytest.raises(ConfigError, match=r"for bins \[7\]"):
        bin_abs_margins(histories)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite MLflow store with two runs logging the 10 bins' metrics at two evals: "flow" with
    abs_margin_k = (1, 3) / (k + 1), loss_k = 0.7, acc_k = 0.5 + k/40; "ddpm" with only acc_0 = 0.8."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bins")
    flow = client.create_run(exp, run_name="flow").info.run_id
    for step, scale in ((10, 1.0), (20, 3.0)):
        for k in range(K):
            client.log_metric(flow, f"bins/abs_margin_{k}", scale / (k + 1), step=step)
            client.log_metric(flow, f"bins/loss_{k}", 0.7, step=step)
            client.log_metric(flow, f"bins/acc_{k}", 0.5 + k / 40, step=step)
    ddpm = client.create_run(exp, run_name="ddpm").info.run_id
    client.log_metric(ddpm, "bins/acc_0", 0.8, step=10)
    return {"uri": uri, "flow": flow, "ddpm": ddpm, "root": root}


def test_calibrate_from_run_writes_a_readable_table(store, tmp_path) -> None:
    """abs_margin_k averaged over its two evals: (1 + 3)/2 / (k + 1) = 2/(k + 1); the written JSON reads back
    as exactly those values."""
    out = tmp_path / "calibration.json"
    from prefopt_core.storage import Location

    record = calibrate_from_run(store["uri"], store["flow"], Location(str(out)))
    assert record["source"]["run_id"] == store["flow"]
    assert read_calibration(str(out)).tolist() == pytest.approx([2.0 / (k + 1) for k in range(K)])


def test_calibrate_from_a_run_without_bins_is_a_sentence(store, tmp_path) -> None:
    from prefopt_core.storage import Location

    with pytest.raises(ConfigError, match="logged no bins/abs_margin"):
        calibrate_from_run(store["uri"], store["ddpm"], Location(str(tmp_path / "c.json")))


# ------------------------------------------------------------------------------------------- shape table
def test_shape_lines_mark_the_configured_weight() -> None:
    """Uniform over sigma = (0.2, 0.5, 0.8): log_snr lambda = (1, 1.5, 2), so mean 1.5, p10 1, p50 1.5, p90 2;
    the configured weight is marked and calibrated without a table says which key it needs."""
    cfg = load_config(None, ["timesteps.sampling=uniform", "loss.timestep_weight=log_snr"])
    schedule = NoiseSchedule(kind="flow", table=torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    lines = {line.split()[0]: line for line in shape_lines(cfg, schedule, None)}
    assert lines["log_snr"].split()[1:] == ["1.500", "1.000", "1.500", "2.000", "<-", "loss.timestep_weight"]
    assert "needs loss.timestep_weight_calibration" in lines["calibrated"]


def test_cli_out_without_calibrate_is_a_user_error(capsys) -> None:
    assert main(["timesteps", "configs/demo.yaml", "--out", "x.json"]) == 2
    assert "--out is where --calibrate RUN_ID writes" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the figure
def test_bin_table_from_hand_made_metrics() -> None:
    """Logged bins land at their index; a bin never logged is None."""
    table = bin_table({"bins/acc_0": 0.6, "bins/acc_9": 0.9, "bins/loss_3": 0.69, "bins/abs_margin_1": 2.0})
    assert table["acc"][0] == 0.6 and table["acc"][9] == 0.9 and table["acc"][5] is None
    assert table["loss"][3] == 0.69 and table["abs_margin"][1] == 2.0


def test_run_bin_metrics_average_the_history(store) -> None:
    """flow: abs_margin_0 = (1 + 3)/2 = 2, loss_4 = 0.7, acc_9 = 0.5 + 9/40 = 0.725."""
    metrics = run_bin_metrics(store["uri"], store["flow"])
    assert metrics["bins/abs_margin_0"] == pytest.approx(2.0)
    assert metrics["bins/loss_4"] == pytest.approx(0.7)
    assert metrics["bins/acc_9"] == pytest.approx(0.725)


def test_plot_imbalance_writes_a_png(tmp_path) -> None:
    """Two hand-made runs (one with a missing bin) -> a PNG of three panels side by side (wider than tall)."""
    from matplotlib.image import imread

    flow = {f"bins/{m}_{k}": 0.5 + k / 20 for m in ("loss", "abs_margin", "acc") for k in range(K)}
    ddpm = {key: value for key, value in flow.items() if not key.endswith("_9")}
    path = plot_imbalance({"flow": flow, "ddpm": ddpm}, tmp_path / "fig" / "imbalance.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert width > 2 * height


def test_plot_imbalance_needs_a_run(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least one run"):
        plot_imbalance({}, tmp_path / "x.png")
