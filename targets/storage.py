"""Where cae2 reads and writes: a local path, or an object in an object store (s3://, gs://, az://), named by
one `Location`. Every command reaches object stores through this module alone.

    loc = Location.of("s3://bucket/in1k/b16.zarr")          # or a local path, or file:///...
    loc / "units" / "shard-000001.tar"                      # children
    loc.get(), loc.put(data), loc.head(), loc.list(), loc.delete()
    loc.put(data, create=True) / loc.put(data, if_match=etag)   # conditional writes (claims, leases)
    loc.download(path), loc.upload(path)                    # whole files, through a temporary name

The client is obstore (Rust object_store): 3-4x faster than boto3 on small objects, one connection pool per
process, retries with exponential backoff bounded by the retry budget (`--retry-seconds`). Its runtime does
not survive a fork: a process that has used it starts its data-loader workers with spawn (`worker_context`).
Credentials and endpoints come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE and ~/.aws, GOOGLE_*, AZURE_*), and from
`--storage-option KEY=VALUE` (obstore's config keys: endpoint, region, allow_http, ...).
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import os
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import obstore
from obstore import exceptions as oe
from obstore.store import from_url as _from_url

from cae2.errors import UserError

REMOTE_SCHEMES = ("s3", "gs", "az", "abfs", "abfss")


def is_remote(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in REMOTE_SCHEMES and "://" in url


def local_path(url: str | os.PathLike) -> Path:
    """A local path from a path or a file:// URL."""
    text = os.fspath(url)
    return Path(urlparse(text).path) if text.startswith("file://") else Path(text)


def inside(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one location is the other or holds it (local paths resolved)."""
    la, lb = Location.of(a), Location.of(b)
    if la.remote != lb.remote:
        return False
    if la.remote:
        x, y = la.url.rstrip("/") + "/", lb.url.rstrip("/") + "/"
        return x.startswith(y) or y.startswith(x)
    pa, pb = la.path.resolve(), lb.path.resolve()
    return pa == pb or pb in pa.parents or pa in pb.parents


def same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two locations name the same thing (local paths resolved)."""
    la, lb = Location.of(a), Location.of(b)
    if la.remote or lb.remote:
        return la.url.rstrip("/") == lb.url.rstrip("/")
    return la.path.resolve() == lb.path.resolve()


# --- settings -----------------------------------------------------------------------------------------------

OPTIONS_VARIABLE, RETRY_VARIABLE = "CAE2_STORAGE_OPTIONS", "CAE2_RETRY_SECONDS"
"""How the options reach processes started later (spawned loader workers, launched ranks inherit them)."""
_clients: dict[tuple, Any] = {}
_lock = threading.Lock()
_down: dict[tuple, float] = {}
"""Clients whose endpoint did not answer for a whole retry budget -> until when (monotonic) their requests fail
at once: a command that stops on such an error does not wait a budget more for each request on its way out."""
REQUESTS: Counter[str] = Counter()
"""Requests this process has made, by kind (get, head, put, list, delete, upload): what benchmarks count."""


def _parse(options: tuple[str, ...] | list[str]) -> dict[str, str]:
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--storage-option {item!r}: expected KEY=VALUE, e.g. endpoint=http://127.0.0.1:8333")
        parsed[key.strip().lower()] = value.strip()
    return parsed


def _from_environment() -> dict[str, Any]:
    options = [line for line in os.environ.get(OPTIONS_VARIABLE, "").splitlines() if line.strip()]
    try:
        retry = float(os.environ.get(RETRY_VARIABLE, "120"))
    except ValueError:
        retry = 120.0
    return {"options": _parse(options), "retry_seconds": retry}


_settings: dict[str, Any] = _from_environment()


def configure(options: tuple[str, ...] | list[str] = (), retry_seconds: float = 120.0) -> None:
    """The process's object-store options (the CLI calls this before a command runs); processes it starts
    get them through the environment."""
    parsed = _parse(options)
    with _lock:
        _settings["options"], _settings["retry_seconds"] = parsed, float(retry_seconds)
        _clients.clear()
        _down.clear()
    os.environ[OPTIONS_VARIABLE] = "\n".join(f"{k}={v}" for k, v in parsed.items())
    os.environ[RETRY_VARIABLE] = str(float(retry_seconds))


def _profile_config() -> dict[str, str]:
    """Credentials, region and endpoint of AWS_PROFILE from ~/.aws/credentials and ~/.aws/config."""
    profile = os.environ.get("AWS_PROFILE")
    if not profile:
        return {}
    out: dict[str, str] = {}
    home = Path(os.environ.get("HOME", "~")).expanduser()
    credentials = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials"))
    config = Path(os.environ.get("AWS_CONFIG_FILE", home / ".aws" / "config"))
    for path, section in ((credentials, profile), (config, profile if profile == "default" else f"profile {profile}")):
        parser = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(path)
        if parser.has_section(section):
            out |= dict(parser.items(section))
    keys = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
            "aws_session_token": "session_token", "region": "region", "endpoint_url": "endpoint"}
    return {keys[k]: v for k, v in out.items() if k in keys}


def _client(scheme: str, bucket: str) -> Any:
    """obstore's client for one bucket of this process (created again after a fork: a new pid)."""
    key = (scheme, bucket, os.getpid())
    with _lock:
        if time.monotonic() < _down.get(key, 0.0):
            raise _EndpointDown
        client = _clients.get(key)
        if client is not None:
            return client
        options = dict(_settings["options"])
        config: dict[str, Any] = {}
        if scheme == "s3":
            config = _profile_config() | options
            endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
                os.environ.get("AWS_ENDPOINT_URL") or ""
            if endpoint.startswith("http://"):
                config.setdefault("allow_http", "true")
        else:
            config = options
        budget = dt.timedelta(seconds=_settings["retry_seconds"])
        retry = {"max_retries": 1000, "retry_timeout": budget,
                 "backoff": {"init_backoff": dt.timedelta(milliseconds=100), "max_backoff": dt.timedelta(seconds=5),
                             "base": 2}}
        client_options = {k: config.pop(k) for k in ("allow_http", "timeout", "connect_timeout") if k in config}
        client_options.setdefault("connect_timeout", "5s")
        client_options.setdefault("timeout", "120s")
        try:
            make: Any = _from_url  # its overloads are per scheme; the options are checked by obstore
            client = make(f"{scheme}://{bucket}", config=config, client_options=client_options, retry_config=retry)
        except Exception as e:  # noqa: BLE001 - obstore reports a bad option in its own types
            raise UserError(f"{scheme}://{bucket}: the object-store client cannot be made ({_short(e)}); check "
                            "--storage-option and the AWS_*/GOOGLE_*/AZURE_* variables") from None
        _clients[key] = client
        return client


def worker_context(*urls: str | os.PathLike | None) -> str | None:
    """The DataLoader multiprocessing context for workers that touch these locations: spawn when one is in
    an object store (obstore's runtime does not survive a fork), else the platform's default (fork)."""
    return "spawn" if any(u is not None and is_remote(u) for u in urls) else None


# --- errors --------------------------------------------------------------------------------------------------

def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    for marker in ("<Code>", "Server returned non-2xx status code:"):
        if marker in text:
            text = text.split(marker, 1)[1] if marker == "<Code>" else text.split(marker, 1)[1]
    return text[:200]


class StorageError(UserError):
    """A request that failed for good: the location, what happened, what to do."""


class _EndpointDown(Exception):  # noqa: N818 - a state, raised where the client is taken
    """The endpoint did not answer an earlier request for a whole retry budget (see `_down`)."""


def _missing(url: str, error: FileNotFoundError, doing: str) -> FileNotFoundError:
    """A missing object stays FileNotFoundError; a missing bucket is a StorageError (nothing can be there)."""
    if "NoSuchBucket" in str(error):
        raise _failure(url, error, doing) from None
    return FileNotFoundError(f"{url} does not exist")


def _failure(url: str, error: BaseException, doing: str) -> StorageError:
    text = str(error)
    if "169.254.169.254" in text or "169.254.170.2" in text:  # no credentials given: the instance metadata asked
        why = ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); this machine's "
               "instance metadata service gave none")
    elif isinstance(error, oe.UnauthenticatedError) or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        why = "the credentials are refused; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    elif isinstance(error, oe.PermissionDeniedError) or "AccessDenied" in text or "403" in text:
        why = "access denied (403); check the credentials and the bucket's policy for this key"
    elif "NoSuchBucket" in text:
        why = "the bucket does not exist; create it or fix the URL"
    elif isinstance(error, _EndpointDown):
        why = (f"the endpoint cannot be reached (an earlier request had no answer for {_settings['retry_seconds']:.0f}"
               " s); check AWS_ENDPOINT_URL (or --storage-option endpoint=...) and the network, or raise "
               "--retry-seconds")
    elif "error sending request" in text or "Connection refused" in text or "connect" in text.lower():
        why = (f"the endpoint cannot be reached after {_settings['retry_seconds']:.0f} s of retries; check "
               "AWS_ENDPOINT_URL (or --storage-option endpoint=...) and the network, or raise --retry-seconds")
        if is_remote(url):
            scheme, rest = url.split("://", 1)
            with _lock:
                _down[(scheme, rest.split("/", 1)[0], os.getpid())] = time.monotonic() + _settings["retry_seconds"]
    else:
        why = _short(error)
    return StorageError(f"{url}: {doing} failed: {why}")


# --- locations -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Meta:
    """What a listing or a HEAD says of an object (or a local file)."""

    name: str
    """Relative to the listed location."""
    size: int
    modified: dt.datetime
    etag: str | None = None


@dataclass(frozen=True)
class Location:
    """A local path or an object-store URL; joins with `/`. Object-store operations need `remote`."""

    url: str

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if is_remote(text):
            scheme, rest = text.split("://", 1)
            return cls(f"{scheme.lower()}://{rest.rstrip('/')}")
        return cls(str(local_path(text)))

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.url.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.url

    @property
    def remote(self) -> bool:
        return is_remote(self.url)

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        if self.remote:
            raise ValueError(f"{self.url} is not a local path")
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.url.rstrip("/").rsplit("/", 1)[0])

    @property
    def _bucket_key(self) -> tuple[str, str, str]:
        scheme, rest = self.url.split("://", 1)
        bucket, _, key = rest.partition("/")
        return scheme, bucket, key

    @property
    def key(self) -> str:
        return self._bucket_key[2]

    @property
    def _client(self) -> Any:
        scheme, bucket, _ = self._bucket_key
        return _client(scheme, bucket)

    # --- reads ---------------------------------------------------------------------------------------

    def get(self) -> bytes:
        """The whole object; FileNotFoundError when there is none."""
        REQUESTS["get"] += 1
        try:
            return bytes(obstore.get(self._client, self.key).bytes())
        except FileNotFoundError as e:
            raise _missing(self.url, e, "reading") from None
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "reading") from None

    def get_with_etag(self) -> tuple[bytes, str | None, dt.datetime]:
        """(bytes, etag, last modified by the server's clock); FileNotFoundError when there is none."""
        REQUESTS["get"] += 1
        try:
            result = obstore.get(self._client, self.key)
            meta = result.meta
            return bytes(result.bytes()), meta.get("e_tag"), meta["last_modified"]
        except FileNotFoundError as e:
            raise _missing(self.url, e, "reading") from None
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "reading") from None

    def head(self) -> Meta | None:
        """The object's size, time and etag; None when there is none."""
        REQUESTS["head"] += 1
        try:
            m = obstore.head(self._client, self.key)
        except FileNotFoundError as e:
            _missing(self.url, e, "looking up")
            return None
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "looking up") from None
        return Meta(self.name, int(m["size"]), m["last_modified"], m.get("e_tag"))

    def exists(self) -> bool:
        return self.head() is not None

    def list(self, after: str = "", before: str = "") -> list[Meta]:
        """Every object under this location (a prefix), names relative to it, sorted; with `after` and `before`,
        only the names between them (exclusive): one listing of that key range (a LIST request per 1,000)."""
        prefix = self.key.rstrip("/") + "/" if self.key else ""
        out: list[Meta] = []
        try:
            for page in obstore.list(self._client, prefix, offset=prefix + after if after else None):
                entries: list[Any] = list(page) if isinstance(page, list) else [page]
                for m in entries:
                    name = m["path"][len(prefix):]
                    if before and name >= before:
                        break
                    out.append(Meta(name, int(m["size"]), m["last_modified"], m.get("e_tag")))
                else:
                    continue
                break
        except FileNotFoundError as e:
            _missing(self.url, e, "listing")
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "listing") from None
        finally:
            REQUESTS["list"] += 1 + len(out) // 1000
        return sorted(out, key=lambda m: m.name)

    def list_folders(self, folders: list[str], per_listing: int = 64) -> list[Meta]:
        """Every object in these folders of this location, listed side by side (16 in flight): the folders
        sorted, in groups of `per_listing`, each group one key range. A folder's keys are the contiguous range
        [folder/, folder0) ('0' follows '/'), so the groups' ranges never overlap."""
        ordered = sorted(folders, key=lambda f: f + "/")
        groups = [ordered[i:i + per_listing] for i in range(0, len(ordered), per_listing)]

        def listed(i: int) -> list[Meta]:  # from the end of the group before (some servers skip a folder
            wanted = set(groups[i])        # named as the start itself): only this group's folders are kept
            after, before = (groups[i - 1][-1] + "0" if i else ""), (groups[i][-1] + "0" if i + 1 < len(groups) else "")
            return [m for m in self.list(after, before) if m.name.split("/", 1)[0] in wanted]

        with ThreadPoolExecutor(max_workers=16) as pool:
            return sorted((m for part in pool.map(listed, range(len(groups))) for m in part), key=lambda m: m.name)

    def children(self, folders_only: bool = False) -> list[str]:
        """The names one level below this location (objects and 'folders', or the folders only), from one
        delimited listing."""
        prefix = self.key.rstrip("/") + "/" if self.key else ""
        try:
            result = obstore.list_with_delimiter(self._client, prefix)
        except FileNotFoundError as e:
            REQUESTS["list"] += 1
            _missing(self.url, e, "listing")
            return []
        except Exception as e:  # noqa: BLE001
            REQUESTS["list"] += 1
            raise _failure(self.url, e, "listing") from None
        names = [p[len(prefix):].rstrip("/") for p in result["common_prefixes"]]
        REQUESTS["list"] += 1 + (len(names) + len(result["objects"])) // 1000
        if not folders_only:
            names += [o["path"][len(prefix):] for o in result["objects"]]
        return sorted(set(names))

    def download(self, path: Path) -> str | None:
        """The object into `path`, whole, through a temporary file beside it (renamed when complete) -> the etag
        of what was copied."""
        REQUESTS["get"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            result = obstore.get(self._client, self.key)
            with open(tmp, "wb") as f:
                for chunk in result.stream(min_chunk_size=8 << 20):
                    f.write(chunk)
            os.replace(tmp, path)
            return result.meta.get("e_tag")
        except FileNotFoundError as e:
            tmp.unlink(missing_ok=True)
            if e.filename:  # a local file system error
                raise
            raise _missing(self.url, e, "downloading") from None
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as e:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise _failure(self.url, e, "downloading") from None

    # --- writes --------------------------------------------------------------------------------------

    def put(self, data: bytes, *, create: bool = False, if_match: str | None = None) -> str | None:
        """Write the whole object -> its etag; with `create`, only if there is none, with `if_match`, only if
        its etag is that one (compare-and-swap): None when the condition does not hold."""
        REQUESTS["put"] += 1
        mode: Any = "create" if create else {"e_tag": if_match} if if_match else "overwrite"
        try:
            return obstore.put(self._client, self.key, data, mode=mode)["e_tag"]
        except (oe.AlreadyExistsError, oe.PreconditionError):
            return None
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "writing") from None

    def upload(self, path: Path) -> str | None:
        """A local file as this object (multipart for large files: atomic, no partial object is seen) -> its
        etag."""
        size, chunk = path.stat().st_size, 16 << 20
        REQUESTS["put"] += 1 if size <= chunk else 2 + -(-size // chunk)  # multipart: create, parts, complete
        try:
            return obstore.put(self._client, self.key, path, chunk_size=chunk, max_concurrency=8).get("e_tag")
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "uploading") from None

    def delete(self) -> None:
        REQUESTS["delete"] += 1
        try:
            obstore.delete(self._client, self.key)
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001
            raise _failure(self.url, e, "deleting") from None

    def delete_tree(self) -> None:
        """Every object under this location (a prefix)."""
        REQUESTS["delete"] += 1
        names = [m.name for m in self.list()]
        for start in range(0, len(names), 1000):
            try:
                obstore.delete(self._client, [f"{self.key.rstrip('/')}/{n}" for n in names[start:start + 1000]])
            except Exception as e:  # noqa: BLE001
                raise _failure(self.url, e, "deleting") from None

    def server_now(self) -> dt.datetime:
        """The object store's clock (staleness is judged by it, never by this host's): the time it gives a
        small object written now beside this location."""
        clock = self.parent / f".clock.{uuid.uuid4().hex}"
        clock.put(b"")
        meta = clock.head()
        with contextlib.suppress(UserError):
            clock.delete()
        if meta is None:
            raise StorageError(f"{clock.url}: an object just written cannot be read back; the store is not "
                               "read-after-write consistent")
        return meta.modified
