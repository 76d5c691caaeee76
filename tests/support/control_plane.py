"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, built from their Go modules (hack/cluster: k8s.io/kubernetes and etcd's
embed package at the versions it requires), each a process of its own in a temporary directory.

What it sets up is what kubeadm would, reduced to one machine:
- a CA; the API server's serving certificate (127.0.0.1, localhost, kubernetes.default.svc);
  client certificates for an admin (group system:masters), the controller manager
  (system:kube-controller-manager) and the scheduler (system:kube-scheduler), whose bootstrap
  RBAC roles the API server creates itself;
- a ServiceAccount token issuer and signing key (TokenRequest works, and the controller manager's
  serviceaccount-token controller and per-controller credentials);
- the API server with the RBAC and Node authorizers and its default admission plugins
  (ValidatingAdmissionPolicy among them), the controller manager with the controllers a Job's
  life needs (job, garbage collector, TTL after finished, namespace, ServiceAccounts and their
  tokens, EndpointSlices, disruption), and the scheduler;
- a Node object with CPU, memory and `nvidia.com/gpu` capacity for the scheduler to bind to,
  Ready and without the not-ready taint (the node lifecycle controller is not run).
  No kubelet runs here: a pod bound to the node stays Pending until a node agent runs it.

`make cluster-tools` builds the binaries into .cache/tools/kube-<version>/ (the Go build cache
makes a rebuild quick); `tools()` builds them when they are missing.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support.client import Client

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "v1.37.2"
TOOLS = ROOT / ".cache" / "tools" / f"kube-{KUBE_VERSION}"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")
SERVICE_RANGE = "10.96.0.0/16"
NODE = "test-node"
# The controllers a Job's life needs (the controller manager's names since Kubernetes 1.30).
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "endpointslice-controller",
    "disruption-controller",
    "cronjob-controller",
    "clusterrole-aggregation-controller",  # the user-facing roles (edit) take the chart's rules
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt, in every projected token volume
)


def tools() -> Path:
    """The control plane's binaries, built from hack/cluster when one is missing."""
    if all((TOOLS / name).exists() for name in BINARIES):
        return TOOLS
    subprocess.run(["make", "-C", str(ROOT), "cluster-tools"], check=True)
    return TOOLS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- certificates ---------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Authority:
    """A CA that signs the API server's certificate and the clients'."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    cert: x509.Certificate | None = None

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        groups: tuple[str, ...] = (),
        hosts: tuple[str, ...] = (),
        server: bool = False,
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a client (CN = user, O = groups) or a server."""
        assert self.cert is not None
        key = _key()
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
            + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        )
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def pem(self) -> bytes:
        assert self.cert is not None
        return self.cert.public_bytes(serialization.Encoding.PEM)


def kubeconfig(
    path: Path,
    url: str,
    ca_file: Path | None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    # The certificates inline (*-data), so the file alone is the whole identity: it works
    # where it is mounted alone (the operator image's test runs the operator in a container).
    def data(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    user: dict[str, Any] = {}
    if cert is not None and key is not None:
        user = {"client-certificate-data": data(cert), "client-key-data": data(key)}
    if token is not None:
        user = {"token": token}
    ca = {"certificate-authority-data": data(ca_file)} if ca_file else {}
    context: dict[str, Any] = {"cluster": "test", "user": "user"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url, **ca}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": context}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


# -- the control plane ----------------------------------------------------------------------


@dataclass
class ControlPlane:
    workdir: Path
    url: str = ""
    ca_file: Path = Path()
    admin: Path = Path()  # the admin's kubeconfig
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    _ca: Authority = field(default_factory=Authority)
    _apiserver_args: list[str] = field(default_factory=list)
    _audit: list[dict[str, Any]] = field(default_factory=list)
    _audit_read: int = 0  # bytes of audit.log parsed into _audit
    # The controller manager's and scheduler's client rate (--kube-api-qps; burst twice that);
    # 0 keeps their defaults (20 and 50 a second), enough for the suite. Clusters that run
    # thousands of pods raise it; the scale benchmark does.
    api_qps: int = 0

    # -- start and stop

    def start(self) -> ControlPlane:
        bin_dir = tools()
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        self.ca_file = pki / "ca.crt"
        self.ca_file.write_bytes(self._ca.pem())
        serving = self._write(
            pki,
            "apiserver",
            self._ca.issue(
                "kube-apiserver",
                hosts=(
                    "127.0.0.1",
                    "localhost",
                    "10.96.0.1",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ),
                server=True,
            ),
        )
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        self.url = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            ],
        )
        self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), 60)
        self._apiserver_args = [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={serving[0]}",
            f"--tls-private-key-file={serving[1]}",
            f"--client-ca-file={self.ca_file}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=false",
            "--profiling=false",
            # One replica on one machine: no need to wait for peers or aggregated APIs.
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            # Every request's metadata, for the tests that count the operator's writes.
            f"--audit-policy-file={self._audit_policy()}",
            f"--audit-log-path={self.workdir / 'audit.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
            # One file, never rotated (the default rotates at 100 MB, which a session or the
            # scale benchmark passes, and audit() reads one file by offset).
            "--audit-log-maxsize=0",
        ]
        self._spawn("kube-apiserver", self._apiserver_args)
        admin_cert = self._write(
            pki, "admin", self._ca.issue("kubetune-admin", groups=("system:masters",))
        )
        self.admin = kubeconfig(
            self.workdir / "admin.kubeconfig",
            self.url,
            self.ca_file,
            cert=admin_cert[0],
            key=admin_cert[1],
        )
        self._wait("kube-apiserver", self._ready, 180)
        kcm = self._write(pki, "kcm", self._ca.issue("system:kube-controller-manager"))
        kcm_config = kubeconfig(
            self.workdir / "kcm.kubeconfig", self.url, self.ca_file, cert=kcm[0], key=kcm[1]
        )
        self._spawn(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--leader-elect=false",
                "--concurrent-job-syncs=5",
                *self._qps(),
            ],
        )
        sched = self._write(pki, "scheduler", self._ca.issue("system:kube-scheduler"))
        sched_config = kubeconfig(
            self.workdir / "scheduler.kubeconfig",
            self.url,
            self.ca_file,
            cert=sched[0],
            key=sched[1],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bin_dir / "kube-scheduler"),
                f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                *self._qps(),
            ],
        )
        self.add_node()
        return self

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5  # the API server drains its watches slowly
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_apiserver(self) -> None:
        """Stop the API server as when its machine goes down (SIGKILL): its clients'
        connections and watches end."""
        process = self.processes["kube-apiserver"]
        process.kill()
        process.wait()

    def start_apiserver(self) -> None:
        """Start it again, on the same port and etcd: its watch cache starts at etcd's current
        revision, so a watch from an older resourceVersion gets 410 Gone."""
        self._spawn("kube-apiserver", self._apiserver_args, append=True)
        self._wait("kube-apiserver", self._ready, 180)

    def second_apiserver(self) -> str:
        """A second API server on the same etcd (a highly available control plane has
        several behind a load balancer): its URL. It stops with the plane."""
        port = free_port()
        args = [
            a
            for a in self._apiserver_args
            if not a.startswith(("--secure-port", "--audit-log-path"))
        ]
        args += [f"--secure-port={port}", f"--audit-log-path={self.workdir / 'audit-2.log'}"]
        self._spawn("kube-apiserver-2", args)
        url = f"https://127.0.0.1:{port}"
        self._wait("kube-apiserver-2", lambda: _ready(self.client(url)), 180)
        return url

    # -- helpers

    def _audit_policy(self) -> Path:
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                # The bodies of FineTuneJob writes (the phases the operator wrote, in order).
                {
                    "level": "Request",
                    "resources": [
                        {
                            "group": "kubetune.dev",
                            "resources": ["finetunejobs", "finetunejobs/status"],
                        }
                    ],
                },
                {"level": "Metadata"},
            ],
        }
        path = self.workdir / "audit-policy.json"
        path.write_text(json.dumps(policy))
        return path

    def _qps(self) -> list[str]:
        if not self.api_qps:
            return []
        return [f"--kube-api-qps={self.api_qps}", f"--kube-api-burst={2 * self.api_qps}"]

    def _write(self, pki: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
        cert, key = pki / f"{name}.crt", pki / f"{name}.key"
        cert.write_bytes(pair[0])
        key.write_bytes(pair[1])
        key.chmod(0o600)
        return cert, key

    def _spawn(self, name: str, argv: list[str], append: bool = False) -> None:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with log.open("ab" if append else "wb") as out:
            self.processes[name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)},
            )

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready in {timeout:.0f} s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        text = self.logs[name].read_text(errors="replace") if name in self.logs else ""
        return "\n".join(text.splitlines()[-lines:])

    def _ready(self) -> bool:
        return _ready(self.client())

    def _context(self, who: str = "admin") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        pki = self.workdir / "pki"
        context.load_cert_chain(pki / f"{who}.crt", pki / f"{who}.key")
        return context

    def client(self, url: str = "") -> Client:
        """The tests' JSON client, as the admin (of `url`: another API server of the plane)."""
        return Client(url or self.url, self._context())

    def node_client(self, name: str = NODE) -> Client:
        """A client with the node's identity, as a kubelet's (system:node:NAME in the group
        system:nodes): the Node authorizer lets it read only the Secrets and ConfigMaps of the
        pods bound to its node and write only their status."""
        pki = self.workdir / "pki"
        if not (pki / f"node-{name}.crt").exists():
            issued = self._ca.issue(f"system:node:{name}", groups=("system:nodes",))
            self._write(pki, f"node-{name}", issued)
        return Client(self.url, self._context(f"node-{name}"))

    def audit(self) -> list[dict[str, Any]]:
        """The API server's audit events so far, in order: only what was appended since the
        last call is read (the log grows all session; tests poll it)."""
        path = self.workdir / "audit.log"
        if path.exists():
            with path.open("rb") as log:
                log.seek(self._audit_read)
                whole = log.read().rpartition(b"\n")[0]  # a line still being written waits
            if whole:
                self._audit_read += len(whole) + 1
                self._audit.extend(json.loads(line) for line in whole.split(b"\n") if line)
        return self._audit

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """One API request as the admin."""
        return self.client().request(method, path, body, content_type)

    def add_node(
        self, name: str = NODE, gpus: int = 8, pods: int = 110, cpu: int = 32, memory_gi: int = 128
    ) -> None:
        """A Node the scheduler can bind to: Ready, with CPU, memory, pods and GPUs (or, if it
        exists, its capacity set to these)."""
        capacity = {
            "cpu": str(cpu),
            "memory": f"{memory_gi}Gi",
            "pods": str(pods),
            "nvidia.com/gpu": str(gpus),
        }
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
        try:
            self.request("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": labels}})
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the suite's node agent",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        status = {"capacity": capacity, "allocatable": capacity, "conditions": [ready]}
        self.merge_patch(f"/api/v1/nodes/{name}/status", {"status": status})
        # The TaintNodesByCondition admission plugin gives a new Node the not-ready taint; the
        # node lifecycle controller (not run: no kubelet posts heartbeats here) would lift it
        # once the node is Ready.
        self.merge_patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}})

    def merge_patch(self, path: str, body: dict[str, Any]) -> Any:
        """A JSON merge patch as the admin."""
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def token(self, namespace: str, account: str, seconds: int = 3600) -> str:
        """A token for a ServiceAccount from the TokenRequest API, as a projected token is."""
        answer = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}},
        )  # fmt: skip
        return str(answer["status"]["token"])

    def kubeconfig_for(self, path: Path, namespace: str, account: str) -> Path:
        return kubeconfig(
            path, self.url, self.ca_file, token=self.token(namespace, account), namespace=namespace
        )


def _ready(client: Client) -> bool:
    try:
        client.request("GET", "/readyz")
    except (OSError, urllib.error.URLError):
        return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start(workdir: Path | None = None, api_qps: int = 0) -> ControlPlane:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kubetune-cp-"))
    plane = ControlPlane(workdir, api_qps=api_qps)
    try:
        return plane.start()
    except BaseException:
        plane.stop()
        raise


def remove(plane: ControlPlane) -> None:
    plane.stop()
    shutil.rmtree(plane.workdir, ignore_errors=True)


def main() -> None:
    """`make cluster`: a control plane to try things against by hand, until Ctrl-C."""
    plane = start()
    print(f"kube-apiserver at {plane.url}")
    print(f"export KUBECONFIG={plane.admin}")
    print(f"logs in {plane.workdir}; Ctrl-C stops it")
    try:
        while all(p.poll() is None for p in plane.processes.values()):
            time.sleep(1)
        print("a component exited; see its log")
    except KeyboardInterrupt:
        pass
    finally:
        remove(plane)


if __name__ == "__main__":
    main()
