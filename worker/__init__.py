"""inpaint-fleet's worker side, in two layers.

- `worker.inference`: the inference library (model, loader, schedulers, denoise runner, pipeline). Torch only.
- the service modules beside it (`app`, `tasks`, `jobs`, `storage`, `events`, `lease`, `settings`, `gpus`,
  `metrics`, `local_run`): Celery, Redis, S3 and metrics around the library.
"""
