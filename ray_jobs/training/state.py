"""What a training worker starts with (:class:`RecipeInputs`) and what its checkpoints carry besides
weights and optimizer state (:class:`TrainState`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from prefopt_core.config import RunConfig

#: Seconds between two training progress records (the driver prints each as one console line).
PROGRESS_EVERY_S = 5.0


@dataclass
class RecipeInputs:
    """Everything a worker is started with (the driver builds it once; Ray pickles it to every worker)."""

    config: RunConfig
    manifest: dict[str, Any]  # the latent cache's manifest (tensor columns and their per-row shapes)
    tracking_uri: str
    base_model_dir: str
    export_dir: str
    run_id: str | None = None  # the MLflow run; None when the server was down at start
    run_identity: Any = None  # ray_jobs.tracking.RunIdentity: lets rank 0 create the run later
    probe: Any = None  # pyarrow table of cache rows for the divergence probe, or None
    sample_prompts: list[str] = field(default_factory=list)
    progress_every_s: float = PROGRESS_EVERY_S


@dataclass
class TrainState:
    """What a checkpoint carries besides weights and optimizer state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over this worker's shard
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        """The known fields of a saved state (checkpoints may carry keys this version no longer has)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})
