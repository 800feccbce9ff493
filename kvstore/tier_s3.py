"""S3 tier: serialized chunks in a bucket of any S3-compatible service (endpoint_url).

Objects are `<prefix><key>.safetensors`. Credentials and region come from boto3's usual
sources (environment, config files). Failures degrade like the Redis tier: fall back, log,
count `errors`, and skip S3 for `retry_after_s`. A missing object is a plain miss.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from kvstore import serialize
from kvstore.breaker import Breaker
from kvstore.quant import StoredChunk
from kvstore.tier_base import SharedTier

T = TypeVar("T")

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3Tier(SharedTier):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None,
                 timeout_s: float = 5.0, retry_after_s: float = 5.0) -> None:
        super().__init__("s3")
        self.bucket = bucket
        self.prefix = prefix
        config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                        retries={"max_attempts": 1, "mode": "standard"})
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._breaker = Breaker("s3", (BotoCoreError, ClientError, OSError), retry_after_s,
                                lambda: self.counters.add(errors=1))

    def _object(self, key: str) -> str:
        return f"{self.prefix}{key}.safetensors"

    def _missing_is_none(self, fn: Callable[[], T]) -> Callable[[], Optional[T]]:
        """Wrap `fn` so a not-found answer is None rather than an error."""
        def call() -> Optional[T]:
            try:
                return fn()
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                    return None
                raise
        return call

    def _read(self, key: str, layers: Optional[range]) -> Optional[tuple[StoredChunk, int]]:
        get = self._missing_is_none(
            lambda: self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read())
        data = self._breaker.call("GET", get, None)
        if data is None:
            return None
        chunk, _ = serialize.from_bytes(key, data)  # whole: the store promotes it
        return chunk, len(data)

    def contains(self, key: str) -> bool:
        head = self._missing_is_none(lambda: self._client.head_object(Bucket=self.bucket, Key=self._object(key)))
        return self._breaker.call("HEAD", head, None) is not None

    def write_bytes(self, key: str, data: bytes) -> None:
        put = lambda: self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)  # noqa: E731
        if self._breaker.call("PUT", put, None) is not None:
            self.counters.add(bytes_written=len(data))

    def remove(self, key: str) -> bool:
        if not self.contains(key):
            return False
        delete = lambda: self._client.delete_object(Bucket=self.bucket, Key=self._object(key))  # noqa: E731
        return self._breaker.call("DELETE", delete, None) is not None

    def close(self) -> None:
        self._client.close()
