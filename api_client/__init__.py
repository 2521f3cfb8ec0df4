"""The client side of inpaint-fleet (no torch): the job schema, the job-state contract in Redis (`state`), the sync
and asyncio clients, the `inpaint` CLI."""
from api_client.client import AsyncInpaintClient, ClientConfig, EnqueueError, InpaintClient
from api_client.schema import Job, JobError, JobStatus

__all__ = ["InpaintClient", "AsyncInpaintClient", "ClientConfig", "EnqueueError", "Job", "JobError", "JobStatus"]
