"""The object-store and local-cache options every command takes, declared once (a base of each command's
config) and applied before the command runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cae2.fields import PathKind, Range
from targets import local_copies, storage


@dataclass(kw_only=True)
class StorageSettings:
    """Options of object stores (s3://, gs://, az://) and of the local cache of their objects."""

    storage_option: tuple[str, ...] = ()
    """KEY=VALUE for the object-store client, repeatable (e.g. endpoint=http://127.0.0.1:8333, region=eu-west-1,
    allow_http=true); the AWS_*, GOOGLE_* and AZURE_* variables and AWS_PROFILE work too."""
    retry_seconds: Annotated[float, Range(min=1)] = 120.0
    """How long one object-store request is retried (with backoff) before the command stops with an error."""
    cache_dir: Annotated[str, PathKind("out_dir")] | None = None
    """Local copies of objects read from object stores (default: CAE2_CACHE_DIR, else ~/.cache/cae2)."""
    cache_size: Annotated[float, Range(min=0)] = local_copies.DEFAULT_GIB
    """GiB the local cache may hold; past it the copies used longest ago go (an epoch that fits reads nothing
    twice from the bucket)."""

    def apply_storage(self) -> None:
        storage.configure(self.storage_option, self.retry_seconds)
        local_copies.configure(self.cache_dir, self.cache_size)
