"""What kopf (the version installed) tells its handlers when a watch ends in 410 Gone and
objects vanished meanwhile, and what watching N FineTuneJobs costs it: the measurement behind
docs/operator.md's "kopf hosts the process; our informers watch".

kopf runs as an operator would run it (kopf.operator, an @kopf.on.event handler, an @kopf.index
and an @kopf.on.delete handler on FineTuneJobs) against a scripted API server on 127.0.0.1 that
serves discovery, then a list of N FineTuneJobs, then a watch that answers 410 Gone; the list
after it has lost one object (deleted while the watch was down, as etcd's compaction can hide a
DELETED event). The script reports what each handler saw for the vanished object, the index's
contents afterwards, kopf's resident memory after listing N objects, and the requests it made.

    .venv/bin/python benchmarks/kopf_relist.py --objects 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

import kopf
from aiohttp import web

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"


def ftj(i: int) -> dict[str, Any]:
    """A FineTuneJob of the size the examples have (about 1 KB as JSON)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {
            "name": f"job-{i:05d}",
            "namespace": f"team-{i % 50}",
            "uid": f"00000000-0000-0000-0000-{i:012d}",
            "resourceVersion": str(10 + i),
            "generation": 1,
            "labels": {"team": f"team-{i % 50}"},
        },
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": "s3://datasets/text-to-sql/train.jsonl", "format": "chat"},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
            "hyperparameters": {"learningRate": 0.0002, "epochs": 1, "batchSize": 8},
            "evaluation": {"metrics": ["exactMatch", "rougeL"], "testSplit": 0.1},
            "gates": [{"metric": "exactMatch", "minImprovement": 0.05, "compareWith": "base"}],
            "output": {"uri": "s3://models/text-to-sql", "credentialsSecret": "s3-credentials"},
            "resources": {"gpus": 1, "memory": "32Gi"},
        },
        "status": {"phase": "Running", "runId": f"{i:08x}"[:8], "attempts": 1},
    }


class Api:
    """The scripted API server: discovery, then list (all objects), watch (410), list (all but
    the vanished one), watch (open until the end)."""

    def __init__(self, objects: int) -> None:
        self.items = [ftj(i) for i in range(objects)]
        self.vanished = self.items[0]["metadata"]["name"]
        self.lists = 0
        self.watches = 0
        self.patches = 0
        self.requests: list[str] = []
        self.relisted = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api", self.core)
        app.router.add_get("/api/v1", self.core_resources)
        app.router.add_get("/apis", self.groups)
        app.router.add_get(f"/apis/{GROUP}/{VERSION}", self.resources)
        app.router.add_get(f"/apis/{GROUP}/{VERSION}/{PLURAL}", self.list_or_watch)
        app.router.add_patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}/{{name}}", self.patch
        )
        app.middlewares.append(self.count)
        return app

    @web.middleware
    async def count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs.split('?')[0]}")
        return await handler(request)

    async def core(self, _: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def core_resources(self, _: web.Request) -> web.Response:
        ns = {"name": "namespaces", "singularName": "namespace", "namespaced": False,
              "kind": "Namespace", "verbs": ["get", "list", "watch"]}  # fmt: skip
        return web.json_response(
            {"kind": "APIResourceList", "groupVersion": "v1", "resources": [ns]}
        )

    async def groups(self, _: web.Request) -> web.Response:
        version = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
        group = {"name": GROUP, "versions": [version], "preferredVersion": version}
        return web.json_response({"kind": "APIGroupList", "groups": [group]})

    async def resources(self, _: web.Request) -> web.Response:
        verbs = ["get", "list", "watch", "patch", "update"]
        res = {"name": PLURAL, "singularName": "finetunejob", "namespaced": True,
               "kind": "FineTuneJob", "verbs": verbs, "shortNames": ["ftj"]}  # fmt: skip
        status = {**res, "name": f"{PLURAL}/status", "verbs": ["get", "patch", "update"]}
        return web.json_response(
            {
                "kind": "APIResourceList",
                "groupVersion": f"{GROUP}/{VERSION}",
                "resources": [res, status],
            }
        )

    async def patch(self, request: web.Request) -> web.Response:
        """kopf's own annotations (last-handled-configuration): taken, the object answered."""
        self.patches += 1
        name = request.match_info["name"]
        obj = next((o for o in self.items if o["metadata"]["name"] == name), None)
        return web.json_response(obj) if obj else web.json_response({"code": 404}, status=404)

    async def list_or_watch(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("true", "1"):
            self.watches += 1
            response = web.StreamResponse()
            await response.prepare(request)
            if self.watches == 1:  # the first watch: its version is gone
                gone = {"kind": "Status", "code": 410, "reason": "Expired",
                        "message": "too old resource version"}  # fmt: skip
                await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
            self.relisted.set()
            await asyncio.sleep(3600)  # open until the script ends
            return response
        self.lists += 1
        items = self.items if self.lists == 1 else self.items[1:]
        version = "100000" if self.lists == 1 else "200000"
        return web.json_response(
            {
                "kind": "FineTuneJobList",
                "apiVersion": f"{GROUP}/{VERSION}",
                "metadata": {"resourceVersion": version},
                "items": items,
            }
        )


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(objects: int) -> None:
    api = Api(objects)
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    registry = kopf.OperatorRegistry()
    seen: dict[str, list[str]] = {"event": [], "delete": []}
    index_holder: dict[str, Any] = {}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", insecure=True)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        settings.persistence.finalizer = "kopf.example/never"  # no finalizer is added below
        settings.watching.reconnect_backoff = 0.1

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="names")
    def names(name: str, **_: Any) -> dict[str, bool]:
        return {name: True}

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def event(name: str, type: str | None, names: kopf.Index, **_: Any) -> None:
        index_holder["index"] = names
        if name == api.vanished:
            seen["event"].append(str(type))

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, optional=True)
    def deleted(name: str, **_: Any) -> None:
        if name == api.vanished:
            seen["delete"].append(name)

    before = rss_mb()
    started = time.monotonic()
    operator = asyncio.create_task(
        kopf.operator(registry=registry, standalone=True, clusterwide=True)
    )
    await asyncio.wait_for(api.relisted.wait(), timeout=600)
    assert not operator.done(), "kopf stopped"
    relisted = time.monotonic() - started
    # Let the relisted events reach the handlers.
    await asyncio.sleep(max(2.0, objects / 2000))
    after = rss_mb()
    index = index_holder.get("index")
    in_index = sorted(index.keys()) if index is not None else []
    result = {
        "kopf": kopf.__version__ if hasattr(kopf, "__version__") else "",
        "objects": objects,
        "vanished": api.vanished,
        "eventsForVanished": seen["event"],
        "deleteHandlerCalledForVanished": bool(seen["delete"]),
        "vanishedStillIndexed": api.vanished in in_index,
        "indexSize": len(in_index),
        "secondsToRelist": round(relisted, 1),
        "rssMbBefore": round(before, 1),
        "rssMbAfter": round(after, 1),
        "lists": api.lists,
        "watches": api.watches,
        "patches": api.patches,
        "requests": len(api.requests),
    }
    json.dump(result, sys.stdout, indent=2)
    print(flush=True)
    # kopf's shutdown waits for every object's worker: not part of the measurement.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(measure(args.objects))


if __name__ == "__main__":
    main()
