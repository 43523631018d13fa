"""Preference training on Ray Train + DeepSpeed (``prefopt train``), one module per job:

* :mod:`.driver` -- checks, MLflow run, the ``TorchTrainer``, the run summary (driver process);
* :mod:`.recipe` -- one worker: DeepSpeed engine, reference, objective, metrics, checkpoints, export;
* :mod:`.context` -- what a worker needs from its runtime (Ray Train, or one local process);
* :mod:`.deepspeed_config` -- the DeepSpeed config of the policy and of a ZeRO-3 reference;
* :mod:`.optim` -- optimizer and lr schedule; :mod:`.lora` -- LoRA adapters and their reference.
"""
