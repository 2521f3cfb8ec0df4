"""The one S3 client configuration, shared by the client and the worker, and how both name a missing bucket."""
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MISSING_BUCKET = "NoSuchBucket"


def s3_client(endpoint_url: str | None, timeout_s: float | None = None):
    """A boto3 S3 client for AWS, MinIO or R2 (endpoint_url None means AWS). timeout_s: connect and read timeout,
    and a single attempt (default: 10 s connect, 60 s read, 3 attempts)."""
    # Checksums only where S3 requires them: MinIO and R2 refuse some of the ones boto3 adds by default.
    attempts = 3 if timeout_s is None else 1
    config = Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": attempts},
                    connect_timeout=timeout_s or 10, read_timeout=timeout_s or 60,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)


def is_missing_bucket(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == MISSING_BUCKET


def missing_bucket_message(client, bucket: str) -> str:
    """What to say when S3 answers NoSuchBucket: which bucket, where, and how to make it."""
    endpoint = client.meta.endpoint_url
    return (f"bucket {bucket!r} does not exist at {endpoint}; create it (e.g. `aws s3 mb s3://{bucket} "
            f"--endpoint-url {endpoint}`, or `mc mb ALIAS/{bucket}` for MinIO) or set INPAINT_BUCKET to a bucket "
            "that exists")
