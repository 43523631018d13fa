"""Preference training on Ray Train + DeepSpeed (``prefopt train``, and streaming ``prefopt online``), one
module per job:

* :mod:`.driver` -- checks, MLflow run, the ``TorchTrainer``, the run summary (driver process);
* :mod:`.recipe` -- one worker: DeepSpeed engine, reference, objective, metrics, checkpoints, export;
* :mod:`.state` -- what a worker starts with and what its checkpoints carry;
* :mod:`.context` -- what a worker needs from its runtime (Ray Train, one local process, streaming);
* :mod:`.deepspeed_config` -- the DeepSpeed config of the policy and of a ZeRO-3 reference;
* :mod:`.optim`, :mod:`.lora`, :mod:`.step_metrics`, :mod:`.sample_grid`, :mod:`.progress_relay`;
* :mod:`.pair_buffer`, :mod:`.policy_sync` -- streaming online training's buffer and weight publication.
"""
