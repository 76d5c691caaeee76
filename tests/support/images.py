"""Runs the built images as Kubernetes runs their containers, with a real container runtime:
docker where an engine answers, else podman (which shares buildah's image storage).

`container_argv` turns a pod's container spec (what the operator builds, or the chart's
Deployment) into a `run` command line, one Kubernetes field at a time:
- `command` replaces the image's ENTRYPOINT and `args` its CMD (kubernetes.io/docs/tasks/
  inject-data-application/define-command-argument-container/#notes);
- the pod's `runAsUser`/`runAsGroup` become `--user`; `readOnlyRootFilesystem` becomes
  `--read-only` (and, with podman, no tmpfs of its own on /tmp, /var/tmp or /run:
  `--read-only-tmpfs=false`, so only what the pod mounts is writable);
  `capabilities.drop: [ALL]` becomes `--cap-drop ALL`, `allowPrivilegeEscalation: false`
  `--security-opt no-new-privileges`;
- every volumeMount becomes a bind mount of a node directory (`readOnly` → `:ro`): emptyDirs
  are directories the caller gives (owned by the pod's fsGroup, as the kubelet makes them),
  a configMap volume is a directory holding its data keys; `medium: Memory` is a tmpfs;
- `terminationMessagePath` is a node file bind-mounted there, as the kubelet does.

Podman in this sandbox: crun cannot set rlimits or run with hybrid cgroups, so podman runs
with runc, the cgroupfs manager and a containers.conf that sets no default ulimits (measured
2026-11-23; `podman run` with its defaults fails here with "setrlimit RLIMIT_NOFILE: Operation
not permitted"). `Runtime.detect` tries podman's defaults first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack import images

SANDBOX_CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"


@dataclass
class Runtime:
    engine: str  # docker | podman
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def detect(cls, workdir: Path, probe_image: str) -> Runtime:
        if images.docker_engine():
            return cls("docker")
        if shutil.which("podman") is None:
            raise RuntimeError("no container runtime: neither a Docker engine nor podman")
        plain = cls("podman")
        if plain.works(probe_image):
            return plain
        conf = workdir / "containers.conf"
        conf.write_text(SANDBOX_CONTAINERS_CONF)
        sandbox = cls(
            "podman",
            ["--runtime", "runc", "--cgroup-manager", "cgroupfs"],
            {"CONTAINERS_CONF": str(conf)},
        )
        if sandbox.works(probe_image):
            return sandbox
        raise RuntimeError(f"podman cannot run {probe_image} here, with its defaults or runc")

    def works(self, image: str) -> bool:
        done = subprocess.run([*self.base(), "--entrypoint", "true", image], capture_output=True)
        return done.returncode == 0

    def cli(self) -> list[str]:
        """The engine's command, its environment included: each command line stands alone."""
        return ["env", *(f"{k}={v}" for k, v in self.env.items()), self.engine]

    def base(self) -> list[str]:
        return [*self.cli(), "run", "--rm", *self.flags]

    def shell(
        self, image: str, script: str, user: str = "1000:1000"
    ) -> subprocess.CompletedProcess[str]:
        """A shell command in the image (no network), for looking inside it."""
        argv = [*self.base(), "--network", "none", "--user", user, "--entrypoint", "sh", image]
        return subprocess.run([*argv, "-c", script], capture_output=True, text=True)

    def container_argv(
        self,
        image: str,
        container: dict[str, Any],
        pod: dict[str, Any],
        volumes: dict[str, Path],
        *,
        network: str = "none",
        extra_mounts: dict[str, tuple[Path, bool]] | None = None,
        termination_log: Path | None = None,
    ) -> list[str]:
        """`volumes`: volume name -> node directory (emptyDir, configMap contents)."""
        argv = [*self.base(), "--network", network]
        pod_security = pod.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        if "runAsUser" in security:
            argv += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', 0)}"]
        if security.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
            if self.engine == "podman":
                argv.append("--read-only-tmpfs=false")
        if "ALL" in ((security.get("capabilities") or {}).get("drop") or []):
            argv += ["--cap-drop", "ALL"]
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        by_name = {v["name"]: v for v in pod.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = by_name[mount["name"]]
            target = mount["mountPath"]
            if (volume.get("emptyDir") or {}).get("medium") == "Memory":
                argv += ["--tmpfs", f"{target}:rw,mode=1777"]
                continue
            suffix = ":ro" if mount.get("readOnly") else ""
            argv += ["--volume", f"{volumes[mount['name']]}:{target}{suffix}"]
        for target, (source, read_only) in (extra_mounts or {}).items():
            argv += ["--volume", f"{source}:{target}{':ro' if read_only else ''}"]
        if termination_log is not None:
            # The kubelet creates the file world-writable, for any runAsUser
            # (kuberuntime_container.go, makeMounts: Chmod(containerLogPath, 0666)).
            termination_log.touch()
            termination_log.chmod(0o666)
            argv += ["--volume", f"{termination_log}:{container['terminationMessagePath']}"]
        for item in container.get("env") or []:
            argv += ["--env", f"{item['name']}={item['value']}"]
        command = container.get("command")
        if command:
            argv += ["--entrypoint", command[0], image, *command[1:]]
        else:
            argv.append(image)
        return argv + list(container.get("args") or [])


def layers(runtime: Runtime, image: str) -> list[str]:
    """The image's layer digests, base first."""
    argv = [*runtime.cli(), "image", "inspect", image]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return list(json.loads(out)[0]["RootFS"]["Layers"])


def node_dir(path: Path, uid: int, copy_of: Path | None = None) -> Path:
    """A directory as the kubelet makes a volume for a pod with this fsGroup: an emptyDir, or,
    given `copy_of`, one holding a copy of that file or folder (data the pod reads)."""
    path.mkdir(parents=True, exist_ok=True)
    if copy_of is not None:
        if copy_of.is_dir():
            shutil.copytree(copy_of, path / copy_of.name)
        else:
            shutil.copy(copy_of, path / copy_of.name)
    for item in [path, *path.rglob("*")]:
        if os.geteuid() == 0:
            os.chown(item, uid, uid)
        else:
            item.chmod(0o777 if item.is_dir() else 0o666)
    return path
