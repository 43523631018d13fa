"""The schema of a prefopt run: one YAML file, validated before anything starts.

Every command reads the same :class:`RunConfig`; a section a command does not use is simply ignored by
it. Unknown keys are rejected with the list of valid ones; cross-field rules live in one validator
(:meth:`RunConfig._check_combinations`) and fail with a sentence saying why.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=20", "loss.beta=500"])
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefopt_core.config_keys import ConfigError, RenamedKey, apply_overrides, check_renamed
from prefopt_core.config_keys import flatten as flatten
from prefopt_core.losses import DEFAULT_BETA, DEFAULT_DPO_CONVENTION, DpoConvention, LossName, get_loss
from prefopt_core.losses import resolved_beta as _resolved_beta
from prefopt_core.models.base import Family
from prefopt_core.reference import OnExceed, ReferenceStrategy, check_strategy
from prefopt_core.storage import Location, StorageError, is_uri, local_scratch
from prefopt_core.timestep_weights import CALIBRATION_KEY, TimestepWeight
from prefopt_core.timesteps import Sampling, TimestepConfig

#: ``model.pretrained`` value that trains the toy testbed's base model (``pipelines.toy_base``).
TOY_BASE = "toy-base"
#: ``model.pretrained`` value that retrains the toy base into ``<workdir>/base_model`` instead of using the shipped one.
TOY_BASE_REBUILD = "toy-base:rebuild"

#: Every renamed key (dotted); :func:`config_from_dict` refuses the old names.
RENAMED_KEYS: tuple[RenamedKey, ...] = (
    RenamedKey(
        "timesteps.reward_scale", "loss.timestep_weight", "true is now inv_sqrt_snr, false is now none"
    ),
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("prefopt", description="Run name: MLflow run name and Ray Train run name (resume key).")
    workdir: str = Field("prefopt_work", description="Directory for everything a run makes.")
    seed: int = Field(0, description="Seeds data generation, noise, timesteps and initialisation.")


class RaySection(_Section):
    address: str | None = Field(
        None,
        description="Ray cluster address ('ray://host:10001', 'auto', ...); None: RAY_ADDRESS, else a new "
        "local Ray on 127.0.0.1; 'local' always starts a new local Ray.",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a *local* Ray (default max(4, cores)); more logical than physical "
        "CPUs keeps Ray Data tasks from being starved by training workers on small machines.",
    )
    include_dashboard: bool = Field(False, description="Start the dashboard of a local Ray (127.0.0.1 only).")


class ModelSection(_Section):
    family: Family = "sd3"
    pretrained: str = Field(
        "tiny",
        description="diffusers pipeline directory or hub id; 'tiny' / 'tiny:toy' build an offline tiny "
        "random pipeline under <workdir>/base_model; 'toy-base' is the toy testbed's shipped, hash-checked base "
        "(SD3; needs model.max_sequence_length=16); 'toy-base:rebuild' retrains it under <workdir>/base_model.",
    )
    resolution: int = Field(32, ge=8, description="Training resolution in pixels (square).")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of frozen modules (VAE, text encoders, reference)."
    )
    lora_rank: int = Field(0, ge=0, description="0: full fine-tuning; >0: LoRA rank via peft.")
    lora_alpha: float | None = Field(None, description="LoRA alpha; default = rank.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names (suffixes) that get LoRA adapters (attention projections by default).",
    )
    init_denoiser: str | None = Field(
        None,
        description="Start the policy (and a frozen/periodic reference) from this save_pretrained denoiser dir "
        "instead of the pipeline's own (e.g. the export of an earlier round); VAE/text encoders stay the base's.",
    )
    max_sequence_length: int = Field(256, ge=1, description="SD3 T5 token length (pipeline default 256).")
    micro_conditioning: Literal["per_image", "constant"] = Field(
        "per_image",
        description="SDXL time ids: per_image (each image's original size + crop, as diffusers' SDXL scripts) "
        "or constant (R, R, 0, 0, R, R), as the official Diffusion-DPO code.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="SD1.5/SDXL: override the scheduler's prediction type."
    )


class SyntheticDataSection(_Section):
    num_pairs: int = Field(48, ge=1, description="Rows of the synthetic Pick-a-Pic-schema source.")
    image_size: int = Field(48, ge=8)
    tie_fraction: float = Field(0.1, ge=0.0, le=1.0)


class DataSection(_Section):
    source: str | None = Field(
        None,
        description="Parquet file/dir/glob, webdataset tar glob or hub id; None writes a synthetic "
        "Pick-a-Pic-schema source under <workdir>/data.",
    )
    split: str | None = None
    tie_policy: Literal["drop", "random", "keep"] = "drop"
    max_pairs: int | None = Field(None, ge=1)
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Checked from the header, before decoding.")
    max_caption_chars: int = Field(2000, ge=1)
    synthetic: SyntheticDataSection = SyntheticDataSection()


class CacheSection(_Section):
    dir: str | None = Field(None, description="Latent cache directory; default <workdir>/cache.")
    batch_size: int = Field(16, ge=1, description="Pairs per encoder forward pass.")
    num_actors: int = Field(1, ge=1, description="Encoder actors in the Ray Data pool.")
    rows_per_shard: int = Field(64, ge=1, description="Input rows per cache shard (the resume unit).")
    cpus_per_actor: float = Field(1.0, gt=0)


class LossSection(_Section):
    name: LossName = "dpo"
    beta: float | None = Field(
        None,
        gt=0,
        description="Default per loss (prefopt_core.losses.DEFAULT_BETA): "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BETA.items() if k != "sft")
        + " (dpo in the official convention).",
    )
    convention: DpoConvention = Field(
        DEFAULT_DPO_CONVENTION,
        description="DPO β convention: diffusers' script drops the 0.5 (its 2500 == official 5000).",
    )
    snr_value: float = Field(0.5, gt=0, description="MaPO c in s(x) = c·x / (exp(c·x) − 1).")
    desirable_weight: float = Field(1.0, ge=0)
    undesirable_weight: float = Field(1.0, ge=0)
    timestep_weight: TimestepWeight = Field(
        "none",
        description="λ(t) in [1, 2] scaling the implicit reward of dpo/kto: none; inv_sqrt_snr = 1 + "
        "minmax(1/√SNR(t)) (Rethinking DPO); inv_sqrt_snr_ddpm_range (1/√SNR min-maxed over SD1.5/SDXL's "
        "DDPM range); log_snr (min-max over log-SNR); calibrated (per-bin, from a calibration run). Shapes: "
        "`prefopt timesteps CONFIG`.",
    )
    timestep_weight_calibration: str | None = Field(
        None,
        description="timestep_weight=calibrated: the calibration JSON (path or URI) written by "
        "`prefopt timesteps CONFIG --calibrate RUN_ID` from a calibration run's bins/abs_margin_k.",
    )

    @model_validator(mode="after")
    def _check_calibration(self) -> LossSection:
        calibrated = self.timestep_weight == "calibrated"
        if calibrated and self.timestep_weight_calibration is None:
            raise ValueError(
                f"loss.timestep_weight=calibrated needs {CALIBRATION_KEY}: the JSON written by "
                "`prefopt timesteps CONFIG --calibrate RUN_ID`"
            )
        if not calibrated and self.timestep_weight_calibration is not None:
            raise ValueError(
                f"{CALIBRATION_KEY} is read only by loss.timestep_weight=calibrated "
                f"(got {self.timestep_weight})"
            )
        return self

    def resolved_beta(self) -> float:
        """``beta``, or the loss's default (:data:`prefopt_core.losses.DEFAULT_BETA`)."""
        return _resolved_beta(self.name, self.beta)


class ReferenceSection(_Section):
    strategy: ReferenceStrategy = "frozen"
    tau: int = Field(32, ge=1, description="periodic: optimizer steps between reference updates.")
    delta: float = Field(
        math.inf, ge=0, description="periodic: stop updating once D(policy‖init) exceeds delta."
    )
    on_exceed: OnExceed = "freeze"
    probe_size: int = Field(8, ge=1, description="Preferred latents in the divergence probe set.")
    precompute_epochs: int = Field(
        1,
        ge=1,
        description="precomputed: epochs of reference errors the cache stores (one draw per pair and epoch).",
    )


class TimestepsSection(_Section):
    sampling: Sampling | None = Field(
        None, description="Default: logit_normal for sd3, uniform for sdxl/sd15."
    )
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    gamma: float = Field(0.9, gt=0, le=1.0)
    bins: int = Field(50, ge=1)


class TrainSection(_Section):
    max_steps: int = Field(20, ge=1, description="Optimizer steps.")
    batch_size: int = Field(2, ge=1, description="Pairs per worker per micro-step.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    gradient_checkpointing: bool = False
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the training workers: PACK (few nodes), SPREAD (many nodes), "
        "STRICT_PACK (one node), STRICT_SPREAD (one worker per node).",
    )
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them.")
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = Field(0, ge=0, description="0: checkpoint only at the end.")
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    fail_at_step: int | None = Field(
        None, ge=1, description="Fault injection (tests): raise once at this step."
    )
    eval_every: int = Field(10, ge=1, description="Steps between probe/KL/bin metrics.")
    log_every: int = Field(
        10,
        ge=1,
        description="Steps between metric syncs: per-step metrics stay on the device and are reduced and "
        "logged (one MLflow entry per step) every log_every steps and at the end.",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged over the generated DeepSpeed config (e.g. {zero_optimization: "
        "{overlap_comm: false}}); checked by DeepSpeed's config model before any worker starts.",
    )
    resume: Literal["auto", "never", "require"] = Field(
        "auto", description="auto: resume if a checkpoint exists; require: fail loudly if none."
    )
    export: bool = True
    sample_prompts: int = Field(
        4,
        ge=0,
        description="Prompts of the end-of-run sample grid (base vs trained, MLflow artifact); 0: none.",
    )
    sample_steps: int = Field(20, ge=1, description="Inference steps of the sample grid.")
    driver_read_max_mb: float = Field(
        256.0,
        ge=0,
        description=(
            "Caches up to this size (MB on disk) are read by the driver and put into the object store "
            "once (no read tasks to start); larger ones are read by Ray Data tasks and streamed every "
            "epoch. 0: always stream."
        ),
    )


class TrackingSection(_Section):
    uri: str | None = Field(
        None, description="MLflow URI; default MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db."
    )
    experiment: str = "prefopt"
    require_server: bool = Field(
        True,
        description="An http(s) uri must answer before a command starts; false: run anyway, keeping metrics "
        "in <workdir>/mlflow_pending.jsonl until the server answers.",
    )


class RegenerateSection(_Section):
    preset: Literal[
        "pick-style-cartoon", "pick-style-pixel-art", "pick-safety", "pick-a-pic-like", "custom"
    ] = "pick-style-cartoon"
    prompts: str | None = Field(
        None, description="Text file (one prompt per line) or parquet with `caption`."
    )
    num_prompts: int | None = Field(None, ge=1)
    pairs_per_prompt: int = Field(1, ge=1, description="Pairs per prompt, each from its own seed.")
    output_dir: str | None = None
    chosen_template: str | None = Field(None, description="custom/override: template with {prompt}.")
    rejected_template: str | None = Field(None, description="custom/override: template with {prompt}.")
    rejected_prefix: str = Field("", description="Prefix of the rejected prompt, e.g. 'Realistic 8k image.'")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    batch_size: int = Field(4, ge=1)
    num_actors: int = Field(1, ge=1)
    rows_per_shard: int = Field(32, ge=1, description="Prompts per output shard (the resume unit).")
    cpus_per_actor: float = Field(1.0, gt=0)
    jpeg_quality: int = Field(95, ge=1, le=100)
    license: str = Field("other", description="Dataset card license, e.g. 'openrail++' for SDXL outputs.")


#: ``online.on_stale``: what happens to rows sampled more than ``online.max_staleness`` versions ago.
OnStale = Literal["drop", "wait"]


class OnlineSection(_Section):
    rounds: int = Field(2, ge=1)
    prompts: str | None = None
    num_prompts: int | None = Field(None, ge=1)
    samples_per_prompt: int = Field(4, ge=2, le=1000)
    min_margin: float = Field(
        0.0, ge=0, description="Keep best vs worst only when their score difference is strictly greater."
    )
    steps_per_round: int = Field(10, ge=1)
    scorer: dict[str, Any] = Field(default_factory=lambda: {"name": "outline_style"})
    num_inference_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(1.0, ge=0)
    batch_size: int = Field(4, ge=1, description="Prompts per pipeline call (x samples_per_prompt images).")
    rows_per_shard: int = Field(32, ge=1, description="Prompts per cache shard (the resume unit).")
    num_actors: int = Field(1, ge=1, description="Sampling actors (one pipeline each) in the Ray Data pool.")
    cpus_per_actor: float = Field(1.0, gt=0)
    mode: Literal["rounds", "streaming"] = Field(
        "rounds",
        description="rounds: sample -> cache -> a new training run per round; streaming: one training run fed "
        "by rollout actors through a pair buffer (train.max_steps steps in all).",
    )
    rollout_actors: int = Field(
        1, ge=1, description="streaming: sampling actors (one pipeline and scorer each)."
    )
    rollout_cpus: float = Field(1.0, gt=0, description="streaming: CPUs per rollout actor.")
    rollout_gpus: float = Field(0.0, ge=0, description="streaming: GPUs per rollout actor.")
    buffer_pairs: int = Field(
        32, ge=1, description="streaming: pair buffer capacity; rollouts wait when it is full."
    )
    reuse: int = Field(1, ge=1, description="streaming: times one pair may be trained on.")
    sync_every: int = Field(4, ge=1, description="streaming: optimizer steps between weight publications.")
    max_staleness: int = Field(
        1,
        ge=0,
        description="streaming: rows sampled more than this many policy versions ago are not trained.",
    )
    on_stale: OnStale = Field(
        "drop",
        description="streaming: drop (and count) rows above max_staleness, or wait: rollouts hold back so rows "
        "stay within it and the trainer waits for fresh ones.",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="streaming: held-out evaluation (eval section) of the policy published every this many "
        "steps, beside training, logged as eval/... at that step; a multiple of sync_every; null: only at the end.",
    )

    @model_validator(mode="after")
    def _check_eval_every(self) -> OnlineSection:
        if self.eval_every is not None and self.eval_every % self.sync_every:
            raise ValueError(
                f"online.eval_every={self.eval_every} must be a multiple of online.sync_every={self.sync_every}: "
                "the evaluation takes the policy published at that step."
            )
        return self


class EvalSection(_Section):
    prompts: str | None = None
    num_prompts: int | None = Field(None, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    scorers: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "outline_style"}])
    models: list[str] = Field(
        default_factory=list,
        description="Exported denoiser dirs (<workdir>/export/transformer), export dirs or full pipeline dirs; "
        "'NAME=PATH' names one.",
    )
    batch_size: int = Field(8, ge=1, description="Prompts per pipeline call.")
    baseline: str | None = Field(None, description="Base pipeline dir; default model.pretrained.")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=0)


class RunConfig(_Section):
    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    cache: CacheSection = CacheSection()
    loss: LossSection = LossSection()
    reference: ReferenceSection = ReferenceSection()
    timesteps: TimestepsSection = TimestepsSection()
    train: TrainSection = TrainSection()
    tracking: TrackingSection = TrackingSection()
    regenerate: RegenerateSection = RegenerateSection()
    online: OnlineSection = OnlineSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        loss, ref = self.loss.name, self.reference.strategy
        if self.model.pretrained in (TOY_BASE, TOY_BASE_REBUILD) and (
            self.model.family != "sd3" or self.model.max_sequence_length != 16
        ):
            raise ValueError(
                f"model.pretrained={TOY_BASE} is the toy testbed's SD3 base, whose text encoders read 16 tokens: "
                f"set model.family=sd3 and model.max_sequence_length=16 (got {self.model.family}, "
                f"{self.model.max_sequence_length})."
            )
        check_strategy(loss, ref)
        get_loss(loss).check_timestep_weight(self.loss.timestep_weight)
        if ref == "precomputed" and self.model.lora_rank > 0:
            raise ValueError(
                "reference.strategy=precomputed with LoRA is pointless: the LoRA reference is free."
            )
        if self.model.lora_rank > 0 and ref == "periodic":
            raise ValueError(
                "model.lora_rank > 0 uses the base model with adapters disabled as the reference, which "
                "cannot be moved to the policy; use reference.strategy=frozen or full fine-tuning."
            )
        if self.model.lora_rank > 0 and self.train.zero_stage == 3:
            raise ValueError(
                "LoRA trains a few small tensors; ZeRO-3 sharding them is unsupported, use zero_stage <= 2."
            )
        if self.train.offload_param and self.train.zero_stage != 3:
            raise ValueError(
                "train.offload_param needs train.zero_stage=3 (DeepSpeed offloads parameters only under ZeRO-3)."
            )
        if self.train.offload_optimizer and self.train.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1.")
        if self.train.fail_at_step is not None and self.train.fail_at_step > self.train.max_steps:
            raise ValueError("train.fail_at_step is after train.max_steps: the fault would never fire.")
        if self.model.micro_conditioning != "per_image" and self.model.family != "sdxl":
            raise ValueError("model.micro_conditioning applies to sdxl only.")
        if self.model.prediction_type is not None and self.model.family == "sd3":
            raise ValueError("model.prediction_type applies to sd15/sdxl; sd3 is flow matching.")
        return self

    # ---- derived values (no state: computed from the fields) ----
    @property
    def workdir(self) -> Location:
        """``run.workdir``: a local directory or an object-store prefix (:mod:`prefopt_core.storage`)."""
        return Location(self.run.workdir)

    @property
    def scratch_dir(self) -> Path:
        """This node's local directory for the files that must be local (the log, the MLflow spill file and
        default store, exports before their upload): the workdir itself when it is local, else
        ``<PREFOPT_LOCAL_DIR>/runs/<workdir name>-<hash of its URI>``."""
        work = self.workdir
        if work.is_local:
            return work.local
        digest = hashlib.sha1(work.uri.encode()).hexdigest()[:12]
        return local_scratch() / "runs" / f"{work.name}-{digest}"

    @property
    def cache_dir(self) -> Location:
        return Location(self.cache.dir) if self.cache.dir else self.workdir / "cache"

    @property
    def base_model_dir(self) -> Location:
        """Where the pretrained pipeline lives (built on demand for 'tiny' models)."""
        if self.model.pretrained.startswith("tiny") or self.model.pretrained.startswith(TOY_BASE):
            return self.workdir / "base_model"
        return Location(self.model.pretrained)

    @property
    def tiny_preset(self) -> str | None:
        p = self.model.pretrained
        if p == "tiny":
            return "test"
        if p.startswith("tiny:"):
            return p.split(":", 1)[1]
        return None

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.scratch_dir / 'mlflow.db'}"

    @property
    def timestep_sampling(self) -> Sampling:
        if self.timesteps.sampling is not None:
            return self.timesteps.sampling
        return "logit_normal" if self.model.family == "sd3" else "uniform"

    def timestep_config(self) -> TimestepConfig:
        """How this run draws training timesteps (the one place a :class:`TimestepConfig` is made from a config)."""
        t = self.timesteps
        return TimestepConfig(
            sampling=self.timestep_sampling,
            logit_mean=t.logit_mean,
            logit_std=t.logit_std,
            gamma=t.gamma,
            bins=t.bins,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else "?"
            lines.append(f"unknown key {loc!r}; valid keys here: {valid}")
        else:
            lines.append(f"{loc or '<config>'}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    check_renamed(data, RENAMED_KEYS)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def _absolute(path: str | None) -> str | None:
    """A local path made absolute; a URI checked (no credentials in it) and kept."""
    if path is None:
        return None
    try:
        return str(Location(path))
    except StorageError as e:
        raise ConfigError(str(e)) from None


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make the run's local paths absolute, against the current directory, and check its URIs.

    Done once, where the config is loaded: Ray workers run in other directories, so a relative
    ``run.workdir`` would otherwise mean a different place in every process.
    """
    cfg.run.workdir = _absolute(cfg.run.workdir)
    cfg.cache.dir = _absolute(cfg.cache.dir)
    for section, key in (
        ("data", "source"),
        ("model", "pretrained"),
        ("model", "init_denoiser"),
        ("regenerate", "prompts"),
        ("regenerate", "output_dir"),
        ("online", "prompts"),
        ("eval", "prompts"),
        ("eval", "baseline"),
    ):
        value = getattr(getattr(cfg, section), key)
        if (value and is_uri(value)) or (
            value
            and not value.startswith("tiny")
            and not value.startswith(TOY_BASE)
            and Path(value).expanduser().exists()
        ):
            setattr(getattr(cfg, section), key, _absolute(value))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded
    apply_overrides(data, list(overrides or []))
    return resolve_paths(config_from_dict(data))
