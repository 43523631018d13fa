"""Streaming online training (``online.mode=streaming``).

Unit tests of the pair buffer's rules (capacity, staleness, at-most-once, ledger) and of the policy
version without Ray Train; then two small streaming runs of the tiny SD3 (8 steps, 1 worker, sync every
2 steps, 2 rollout actors, checkpoint every 4):

* ``clean``: a rollout actor is killed once the second policy version is published; the policy of step
  4 is evaluated on held-out prompts beside training (``online.eval_every=4``);
* ``faulted``: the training worker raises at step 6 (``train.fail_at_step``) and Ray Train restarts the
  group from the step-4 checkpoint; then the same command runs again on its workdir with 2 more steps
  (``rerun``) and resumes from the step-8 checkpoint and the ledger.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from prefopt_core.config import ConfigError, config_from_dict, load_config
from ray_jobs.training.pair_buffer import VERSION_COLUMN, PairBufferState
from ray_jobs.training.policy_sync import eval_due, policy_version
from tests._runs import history

STEPS = 8
SYNC = 2
EVAL_EVERY = 4


def _rows(*ids: str) -> pa.Table:
    return pa.table({"pair_id": pa.array(list(ids), pa.string()), "x": pa.array(range(len(ids)), pa.int64())})


# ------------------------------------------------------------------------------------------ buffer rules
def test_push_refuses_what_does_not_fit_and_keeps_everything_it_took():
    """Capacity 3: two rows fit (2 <= 3), two more do not (4 > 3: "full", nothing stored), after a take of
    two rows they do. Nothing is lost: 2 + 2 pushed, 2 taken, 2 left."""
    buf = PairBufferState(capacity=3, max_staleness=5)
    assert buf.push(_rows("a", "b"), version=0) == "ok"
    assert buf.push(_rows("c", "d"), version=0) == "full"
    assert buf.take(2, trainer_version=0, rank=0)["pair_id"].to_pylist() == ["a", "b"]
    assert buf.push(_rows("c", "d"), version=0) == "ok"
    assert buf.counts["pushed"] == 4 and len(buf.rows) == 2


def test_a_push_larger_than_the_capacity_fits_an_empty_buffer():
    """An empty buffer takes any push (3 rows into capacity 1), else a large batch would wait forever."""
    buf = PairBufferState(capacity=1, max_staleness=0)
    assert buf.push(_rows("a", "b", "c"), version=0) == "ok"


def test_take_drops_stale_and_rolled_back_rows_and_counts_them():
    """max_staleness 1, trainer at version 3: rows of version 1 (age 2) are stale, version 2 (age 1) and 3
    (age 0) are kept, version 4 (age -1: sampled by a policy a restart rolled back) is dropped."""
    buf = PairBufferState(capacity=10, max_staleness=1)
    for pid, version in (("v1", 1), ("v2", 2), ("v3", 3), ("v4", 4)):
        buf.push(_rows(pid), version=version)
    taken = buf.take(2, trainer_version=3, rank=0)
    assert taken["pair_id"].to_pylist() == ["v2", "v3"]
    assert taken[VERSION_COLUMN].to_pylist() == [2, 3]
    assert buf.counts["dropped_stale"] == 1 and buf.counts["dropped_rollback"] == 1


def test_take_waits_for_a_full_batch():
    """Two fresh rows and a batch of three: None (the worker asks again), and the two rows stay."""
    buf = PairBufferState(capacity=10, max_staleness=0)
    buf.push(_rows("a", "b"), version=0)
    assert buf.take(3, trainer_version=0, rank=0) is None
    assert len(buf.rows) == 2


def test_rows_are_handed_out_at_most_reuse_times():
    """reuse 1: one take of one row empties the buffer; reuse 2: the row comes back once, then never."""
    once = PairBufferState(capacity=4, max_staleness=0)
    once.push(_rows("a"), version=0)
    assert once.take(1, 0, 0) is not None and once.take(1, 0, 0) is None
    twice = PairBufferState(capacity=4, max_staleness=0, reuse=2)
    twice.push(_rows("a"), version=0)
    assert [twice.take(1, 0, 0) is not None for _ in range(3)] == [True, True, False]


def test_the_ledger_survives_a_restart_and_refuses_an_id_handed_out_before(tmp_path):
    """A row taken by one buffer is in the ledger; a new buffer on the same ledger (a rerun after the
    driver died) refuses to take that id again."""
    ledger = tmp_path / "ledger.jsonl"
    first = PairBufferState(capacity=4, max_staleness=0, ledger_path=ledger)
    first.push(_rows("a"), version=0)
    first.take(1, trainer_version=0, rank=1)
    assert json.loads(ledger.read_text()) == {"pair_id": "a", "version": 0, "trainer_version": 0, "rank": 1}
    second = PairBufferState(capacity=4, max_staleness=0, ledger_path=ledger)
    with pytest.raises(ValueError, match="pushed twice"):
        second.push(_rows("a"), version=0)


def test_staleness_statistics_cover_the_rows_taken_since_the_last_call():
    """Rows of versions 0 and 2 taken at trainer version 2: staleness 2 and 0, mean 1, max 2; the next
    call, with nothing taken in between, reports no staleness."""
    buf = PairBufferState(capacity=4, max_staleness=2)
    buf.push(_rows("a"), version=0)
    buf.push(_rows("b"), version=2)
    buf.take(2, trainer_version=2, rank=0)
    stats = buf.stats()
    assert stats["online/staleness_mean"] == 1.0 and stats["online/staleness_max"] == 2.0
    assert "online/staleness_mean" not in buf.stats()


def _waiting(**kw) -> PairBufferState:
    """on_stale=wait, max_staleness 0, sync every 2 steps, 1 row per step (unless overridden)."""
    return PairBufferState(
        **{"capacity": 10, "max_staleness": 0, "on_stale": "wait", "sync_every": 2, "rows_per_step": 1, **kw}
    )


def test_wait_admits_a_block_only_if_its_rows_can_be_trained_within_the_bound():
    """Trainer before step 1; version-0 rows are trainable for steps 1..T(0) = (0 + 0 + 1) * 2 = 2: 2 rows.
    Rollouts 0 and 1 get a 1-prompt block each (0 + 1 <= 2, 1 + 1 <= 2); rollout 2 is held back (2 + 1 > 2).
    Both rows are then taken for steps 1 and 2 at version (step - 1) // 2 = 0: staleness 0, nothing dropped.
    After the take for step 2, version 0 has (2 - 2 + 1) * 1 - 1 = 0 trainable rows left: held back; with the
    policy of version 1 (T(1) = 4: (4 - 2 + 1) * 1 - 1 = 2 rows) the block is admitted."""
    buf = _waiting()
    assert [buf.next_block(owner, version=0, prompts=1) for owner in (0, 1, 2)] == [0, 1, None]
    buf.push(_rows("a"), version=0, owner=0)
    buf.push(_rows("b"), version=0, owner=1)
    taken = [buf.take(1, trainer_version=0, rank=0, step=s)[VERSION_COLUMN][0].as_py() for s in (1, 2)]
    assert taken == [0, 0] and buf.counts["dropped_stale"] == 0
    assert buf.next_block(2, version=0, prompts=1) is None
    assert buf.next_block(2, version=1, prompts=1) == 2


def test_wait_admits_an_oversized_block_into_an_idle_buffer():
    """sync every step: T(0) = 1, one version-0 row is trainable. A 3-prompt block does not fit (3 > 1), but
    nothing is buffered or in flight and one of its rows fits: admitted, so it cannot wait forever."""
    buf = _waiting(sync_every=1)
    assert buf.trainable_rows(0) == 1
    assert buf.next_block(0, version=0, prompts=3) == 0


def test_drop_never_holds_a_rollout_back():
    """The state that holds rollout 2 back under wait (2 prompts in flight, 2 trainable) admits it under drop."""
    buf = _waiting(on_stale="drop")
    assert [buf.next_block(owner, version=0, prompts=1) for owner in (0, 1, 2)] == [0, 1, 2]


def test_the_block_of_a_dead_rollout_no_longer_holds_others_back():
    """Rollouts 0 and 1 fill the 2 trainable rows; rollout 2 waits until rollout 0's death is reported
    (its block will never be pushed: 1 + 1 <= 2), and the restart is counted."""
    buf = _waiting()
    buf.next_block(0, version=0, prompts=1)
    buf.next_block(1, version=0, prompts=1)
    assert buf.next_block(2, version=0, prompts=1) is None
    buf.forget(0)
    assert buf.next_block(2, version=0, prompts=1) == 2
    assert buf.counts["rollout_restarts"] == 1


def test_periodic_evaluations_are_due_every_eval_every_steps_before_the_last():
    """eval_every 4: steps 4 and 8 of 10 (step 10 is the final evaluation's), step 4 only of 8; none
    without eval_every."""
    assert [s for s in range(11) if eval_due(s, 4, 10)] == [4, 8]
    assert [s for s in range(9) if eval_due(s, 4, 8)] == [4]
    assert not any(eval_due(s, None, 8) for s in range(9))


def test_eval_every_must_be_a_multiple_of_sync_every():
    """The evaluation takes a published policy: eval_every 3 with sync_every 2 is refused by name."""
    with pytest.raises(ConfigError, match=r"online\.eval_every=3 must be a multiple of online\.sync_every=2"):
        load_config(None, ["online.eval_every=3", "online.sync_every=2"])


def test_policy_version_counts_finished_sync_intervals():
    """sync_every 4: steps 0-3 -> version 0, 4-7 -> 1, 8 -> 2."""
    assert [policy_version(s, 4) for s in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]


# ------------------------------------------------------------------------------------------ runs
def _config(workdir: Path, tiny_sd3: Path, *extra: str):
    return load_config(
        None,
        [
            "run.name=stream",
            f"run.workdir={workdir}",
            f"model.pretrained={tiny_sd3}",
            "model.resolution=32",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            "tracking.experiment=stream-test",
            "online.mode=streaming",
            "online.num_prompts=4",
            "online.samples_per_prompt=2",
            "online.num_inference_steps=2",
            "online.scorer={name: brightness}",
            "online.batch_size=1",
            "online.rollout_actors=2",
            "online.rollout_cpus=0.5",
            "online.buffer_pairs=4",
            f"online.sync_every={SYNC}",
            "online.max_staleness=1",
            "loss.name=dpo",
            "loss.beta=500",
            "reference.strategy=periodic",
            "reference.tau=2",
            "reference.probe_size=2",
            "train.batch_size=1",
            "train.num_workers=1",
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=4",
            "train.lr=1e-4",
            "train.sample_prompts=0",
            "eval.seeds=[0]",
            "eval.num_prompts=2",
            "eval.num_inference_steps=2",
            "eval.scorers=[{name: brightness}]",
            *extra,
        ],
    )


def _ledger(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["ledger"]).read_text().splitlines()]


def _kill_a_rollout_after_second_publication(cfg, stop: threading.Event) -> None:
    """Kill rollout actor 0 (Ray restarts it) once the ledger shows a row taken at trainer version 1."""
    import ray

    from ray_jobs.online_streaming import rollout_actor_name

    ledger = cfg.workdir / "online_stream" / "ledger.jsonl"
    while not stop.is_set():
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        if any(json.loads(x)["trainer_version"] >= 1 for x in lines):
            ray.kill(ray.get_actor(rollout_actor_name(cfg, 0)), no_restart=False)
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_sd3, ray_cluster):
    """``(config, summary, trainer builds)`` of the run whose rollout actor 0 is killed mid-run."""
    from ray_jobs import online_streaming

    cfg = _config(tmp_path_factory.mktemp("stream_clean"), tiny_sd3, f"online.eval_every={EVAL_EVERY}")
    builds = []
    original = online_streaming.build_streaming_trainer

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_rollout_after_second_publication, args=(cfg, stop), daemon=True)
    killer.start()
    online_streaming.build_streaming_trainer = counting
    try:
        summary = online_streaming.run_streaming(cfg)
    finally:
        online_streaming.build_streaming_trainer = original
        stop.set()
    return cfg, summary, len(builds)


def test_policy_versions_are_published_every_sync_and_logged_per_step(clean_run):
    """Publications at the start (step 0) and at steps 2, 4, 6, 8 with versions step // 2 = 0..4 (>= 2
    syncs); the logged ``online/policy_version`` at steps 1..8 is step // 2: 0,1,1,2,2,3,3,4."""
    cfg, summary, _ = clean_run
    assert [(p["step"], p["version"]) for p in summary["publications"]] == [
        (s, s // 2) for s in (0, 2, 4, 6, 8)
    ]
    logged = history(cfg.tracking_uri, summary["mlflow_run_id"], "online/policy_version")
    assert logged == [(s, float(s // SYNC)) for s in range(1, STEPS + 1)]


def test_every_trained_row_is_within_the_staleness_bound(clean_run):
    """8 steps x 1 pair = 8 rows handed out (the ledger), each with 0 <= trainer - sampling version <= 1."""
    _, summary, _ = clean_run
    rows = _ledger(summary)
    assert len(rows) == STEPS
    assert all(0 <= r["trainer_version"] - r["version"] <= 1 for r in rows)


def test_the_trainer_is_started_exactly_once(clean_run):
    """One TorchTrainer built and one worker group start (one start publication)."""
    _, summary, builds = clean_run
    assert builds == 1 and summary["worker_group_starts"] == 1


def test_a_killed_rollout_actor_is_replaced_and_the_run_completes(clean_run):
    """The actor killed mid-run is counted once and the run still reaches step 8 with its export."""
    _, summary, _ = clean_run
    assert summary["rollout_restarts"] == 1 and not summary["rollout_errors"]
    assert summary["publications"][-1]["step"] == STEPS
    assert (Path(summary["final_export"]) / "config.json").is_file()


def test_the_held_out_evaluation_is_logged_every_eval_every_steps(clean_run):
    """eval_every 4 of 8 steps: the evaluator scores the step-4 publication beside training and the final
    evaluation the step-8 export, so eval/brightness/mean and win_rate are logged at steps 4 and 8."""
    cfg, summary, _ = clean_run
    assert list(summary["periodic_evals"]) == ["4"]
    for key in ("eval/brightness/mean", "eval/brightness/win_rate"):
        assert [s for s, _ in history(cfg.tracking_uri, summary["mlflow_run_id"], key)] == [4, 8]


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, tiny_sd3, ray_cluster):
    from ray_jobs.online_streaming import run_streaming

    cfg = _config(
        tmp_path_factory.mktemp("stream_fault"),
        tiny_sd3,
        "online.rollout_actors=1",
        "train.fail_at_step=6",
        "train.max_failures=1",
        "train.export=false",
    )
    return cfg, run_streaming(cfg)


def test_a_worker_fault_resumes_at_the_checkpoint_version(faulted_run):
    """The fault at step 6 fires before that step's publication; the restarted group starts from the
    step-4 checkpoint and republishes version 4 // 2 = 2 as a start, then publishes steps 6 and 8."""
    _, summary = faulted_run
    pubs = [(p["step"], p["version"], p["start"]) for p in summary["publications"]]
    assert pubs == [(0, 0, True), (2, 1, False), (4, 2, False), (4, 2, True), (6, 3, False), (8, 4, False)]


def test_no_pair_is_handed_out_twice_across_a_restart(faulted_run):
    """Every pair id in the ledger is unique, and after the restart no row of a rolled-back version
    (above the restored trainer's) was trained: staleness stays in [0, 1]."""
    _, summary = faulted_run
    rows = _ledger(summary)
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)) >= STEPS
    assert all(0 <= r["trainer_version"] - r["version"] <= 1 for r in rows)


@pytest.fixture(scope="module")
def rerun(faulted_run):
    """The faulted run's command run again on its workdir with 2 more steps: the state a driver that died
    after its step-8 checkpoint leaves (checkpoint, ledger, launch counter, MLflow run)."""
    from ray_jobs.online_streaming import run_streaming

    cfg, first = faulted_run
    data = cfg.to_dict()
    data["train"]["max_steps"] = STEPS + 2
    return first, run_streaming(config_from_dict(data))


def test_a_rerun_resumes_from_the_checkpoint_and_the_ledger(rerun):
    """Launch 1 (attempt 1) resumes the same MLflow run from the step-8 checkpoint: its first publication
    is a start at version 8 // 2 = 4, then step 10 (version 5); the ledger holds both launches' rows
    (``online-r0:`` and ``online-r1:`` ids), none twice."""
    first, second = rerun
    assert second["attempt"] == 1 and second["mlflow_run_id"] == first["mlflow_run_id"]
    pubs = [(p["step"], p["version"], p["start"]) for p in second["publications"]]
    assert pubs == [(8, 4, True), (10, 5, False)]
    ids = [r["pair_id"] for r in _ledger(second)]
    assert len(ids) == len(set(ids)) >= STEPS + 2
    assert {i.split(":")[0] for i in ids} == {"online-r0", "online-r1"}
