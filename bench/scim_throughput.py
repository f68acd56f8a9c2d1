"""Throughput of the SCIM emulator as seen by a client in another process (not a timed test).

Starts `python -m daemon.sandbox.scim --profile generic --port 0` (zero latency), creates a few users,
then sends a bounded number of simple requests with aiohttp from this process and prints req/s for
`GET /Users/{id}` and for `POST /Users`. Target: >= 2,000 req/s.

    /tmp/venv/bin/python bench/scim_throughput.py [--requests 20000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import time

import aiohttp

from daemon.sandbox.scim import DEFAULT_TOKEN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emulators import proc_cpu_seconds

DEFAULT_REQUESTS = 20_000
DEFAULT_CONCURRENCY = 32
DEFAULT_SEED_USERS = 200
TARGET_RPS = 2_000.0
HEADERS = {"Authorization": f"Bearer {DEFAULT_TOKEN}", "Content-Type": "application/scim+json"}


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.sandbox.scim", "--profile", "generic", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"emulator did not start (got {url!r})")
    return proc, url


async def _run(n: int, concurrency: int, call: object) -> float:
    counter = itertools.count()

    async def worker() -> None:
        while next(counter) < n:
            await call()  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def bench(url: str, n: int, concurrency: int, pid: int) -> dict[str, tuple[float, float]]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:
        ids = []
        for i in range(DEFAULT_SEED_USERS):
            async with session.post(f"{url}/Users", json={"userName": f"seed{i}@example.com"}) as resp:
                assert resp.status == 201, resp.status
                ids.append((await resp.json(content_type=None))["id"])
        pick = itertools.cycle(ids)

        async def get() -> None:
            async with session.get(f"{url}/Users/{next(pick)}") as resp:
                assert resp.status == 200, resp.status
                await resp.read()

        serial = itertools.count()

        async def post() -> None:
            body = b'{"userName":"bench%d@example.com","active":true}' % next(serial)
            async with session.post(f"{url}/Users", data=body) as resp:
                assert resp.status == 201, resp.status
                await resp.read()

        await _run(min(n, 1000), concurrency, get)  # warm-up
        results = {}
        for name, call, count in (("GET /Users/{id}", get, n), ("POST /Users", post, n // 2)):
            cpu = proc_cpu_seconds(pid)
            rps = await _run(count, concurrency, call)
            results[name] = (rps, (proc_cpu_seconds(pid) - cpu) / count * 1e6)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    args = parser.parse_args()
    proc, url = start_emulator()
    try:
        results = asyncio.run(bench(url, args.requests, args.concurrency, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    ok = True
    for name, (rps, cpu_us) in results.items():
        verdict = "ok" if rps >= TARGET_RPS else "BELOW TARGET"
        ok = ok and rps >= TARGET_RPS
        print(f"{name:18s} {rps:8.0f} req/s  ({verdict}, target {TARGET_RPS:.0f}); "
              f"server CPU {cpu_us:.0f} us/request (= {1e6 / cpu_us:.0f} req/s on one free core)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
