"""Benchmark: page 100,000 PingOne users at limit 1000 from a client in another process.

Run: python bench/pingone_paging.py [--users N] [--limit L]. Prints generation time, the paging
time (token + every page, JSON parsed by the client) and pages/s. Target: paging < 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

import aiohttp

from daemon.sandbox.directory import generate
from daemon.sandbox.pingone import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, PingOneEmulator
from daemon.sandbox.server import serve


def _server(users: int, groups: int, ready: Any, stop: Any) -> None:
    async def main() -> None:
        started = time.perf_counter()
        directory = generate(users, groups)
        generated = time.perf_counter() - started
        emulator = PingOneEmulator(directory)
        async with serve(emulator.app()) as base_url:
            ready.send((base_url, directory.env_id, generated))
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


async def _client(base_url: str, env_id: str, limit: int) -> tuple[int, int, float]:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        auth_header = {"Authorization": aiohttp.encode_basic_auth(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)}
        async with session.post(f"{base_url}/{env_id}/as/token", data={"grant_type": "client_credentials"},
                                headers=auth_header) as response:
            token = (await response.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        url: str | None = f"{base_url}/v1/environments/{env_id}/users?limit={limit}"
        seen = pages = 0
        while url:
            async with session.get(url, headers=headers) as response:
                body = await response.json()
            seen += len(body["_embedded"]["users"])
            pages += 1
            url = body["_links"].get("next", {}).get("href")
    return seen, pages, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=1_000)
    parser.add_argument("--limit", type=int, default=1000)
    args = parser.parse_args()
    receive, send = multiprocessing.Pipe(duplex=False)
    stop = multiprocessing.Event()
    process = multiprocessing.Process(target=_server, args=(args.users, args.groups, send, stop))
    process.start()
    try:
        base_url, env_id, generated = receive.recv()
        print(f"generate({args.users}, {args.groups}): {generated:.2f} s")
        seen, pages, elapsed = asyncio.run(_client(base_url, env_id, args.limit))
        print(f"paged {seen} users in {pages} pages (limit {args.limit}): {elapsed:.2f} s, "
              f"{seen / elapsed:,.0f} users/s")
    finally:
        stop.set()
        process.join(10)


if __name__ == "__main__":
    main()
