"""The inference library: model, weight loading, schedulers, image handling, the denoise runner and the pipeline;
`names` holds the names and bounds it accepts (stdlib only, so the service's settings can import them).

It imports nothing of the service around it (Celery, Redis, S3, metrics): the service in `worker/` calls it,
never the other way round. The public entry point is `worker.inference.pipeline.InpaintPipeline`.
"""
