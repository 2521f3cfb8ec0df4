"""S3 access for jobs: size-limited reads, first-writer-wins writes, presigned URLs, a bucket allowlist.

Errors become JobError: a missing (or forbidden) object is `input_not_found`, anything the store may recover from
(network, throttling, 5xx) is `storage_unavailable` (transient, so the job is retried).
"""
import hashlib
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from api_client import schema
from api_client.s3 import is_missing_bucket, missing_bucket_message, s3_client

__all__ = ["Storage", "StoredObject"]

MISSING_CODES = {"NoSuchKey", "404", "NotFound", "AccessDenied", "403"}
PRECONDITION_FAILED = "PreconditionFailed"


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    sha256: str
    written: bool   # False: an earlier attempt had already written it, and that object is kept


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class Storage:
    def __init__(self, client, allowed_buckets, max_input_bytes: int, presign_expiry_s: int):
        self.client, self.allowed_buckets = client, frozenset(allowed_buckets)
        self.max_input_bytes, self.presign_expiry_s = max_input_bytes, presign_expiry_s

    @classmethod
    def from_settings(cls, settings) -> "Storage":
        client = s3_client(settings.s3_endpoint_url)
        return cls(client, settings.bucket_allowlist, settings.max_input_bytes, settings.presign_expiry_s)

    def check_bucket(self, name: str, bucket: str) -> None:
        if bucket not in self.allowed_buckets:
            allowed = ", ".join(sorted(self.allowed_buckets)) or "none configured"
            raise schema.JobError(schema.INVALID_INPUT, f"{name}: bucket {bucket!r} is not allowed "
                                                        f"(allowed: {allowed}; see INPAINT_ALLOWED_BUCKETS)")

    def read(self, name: str, bucket: str, key: str) -> bytes:
        """The object's bytes; limit_exceeded when it is larger than max_input_bytes."""
        self.check_bucket(name, bucket)
        where = f"{name}: s3://{bucket}/{key}"
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                if response.get("ContentLength", 0) > self.max_input_bytes:
                    raise self._too_large(where, response["ContentLength"])
                data = body.read(self.max_input_bytes + 1)
            finally:
                body.close()
        except ClientError as error:
            raise self._mapped(where, bucket, error) from None
        except BotoCoreError as error:
            raise schema.JobError(schema.STORAGE_UNAVAILABLE, f"{where}: {error}") from None
        if len(data) > self.max_input_bytes:
            raise self._too_large(where, len(data))
        return data

    def _too_large(self, where: str, size: int) -> schema.JobError:
        return schema.JobError(schema.LIMIT_EXCEEDED, f"{where} is {size} bytes, over the limit of "
                                                      f"{self.max_input_bytes} bytes (INPAINT_MAX_INPUT_BYTES)")

    def _mapped(self, where: str, bucket: str, error: ClientError) -> schema.JobError:
        code = _error_code(error)
        if is_missing_bucket(error):
            return schema.JobError(schema.INPUT_NOT_FOUND, f"{where}: {missing_bucket_message(self.client, bucket)}")
        if code in MISSING_CODES or _http_status(error) in (403, 404):
            return schema.JobError(schema.INPUT_NOT_FOUND, f"{where}: {code or 'not found'}")
        return schema.JobError(schema.STORAGE_UNAVAILABLE, f"{where}: {code or error}")

    def write_once(self, bucket: str, key: str, body: bytes, content_type: str, metadata: dict) -> StoredObject:
        """Store `body` unless the key exists (If-None-Match: *): the first attempt's object wins, so a retried
        or redelivered job never replaces images a client may already have fetched."""
        self.check_bucket("output.bucket", bucket)
        sha256 = hashlib.sha256(body).hexdigest()
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*",
                                   Metadata={**{k: str(v) for k, v in metadata.items()}, "sha256": sha256})
            return StoredObject(bucket, key, sha256, written=True)
        except ClientError as error:
            if is_missing_bucket(error):   # transient: the job is retried, and runs once the bucket exists
                message = missing_bucket_message(self.client, bucket)
                raise schema.JobError(schema.STORAGE_UNAVAILABLE, f"output: s3://{bucket}/{key}: {message}") from None
            if _error_code(error) != PRECONDITION_FAILED and _http_status(error) != 412:
                raise schema.JobError(schema.STORAGE_UNAVAILABLE,
                                      f"output: s3://{bucket}/{key}: {_error_code(error) or error}") from None
        except BotoCoreError as error:
            raise schema.JobError(schema.STORAGE_UNAVAILABLE, f"output: s3://{bucket}/{key}: {error}") from None
        return StoredObject(bucket, key, self._stored_sha256(bucket, key), written=False)

    def _stored_sha256(self, bucket: str, key: str) -> str:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as error:
            raise schema.JobError(schema.STORAGE_UNAVAILABLE, f"output: s3://{bucket}/{key}: {error}") from None
        return head.get("Metadata", {}).get("sha256", "")

    def presigned_url(self, bucket: str, key: str) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=self.presign_expiry_s)
