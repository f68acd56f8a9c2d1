"""Reading an HTTP response body whole, and bounded."""

from __future__ import annotations

import aiohttp

CHUNK = 1 << 16


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first limit+1 bytes or so when it is larger (the caller refuses it).

    `StreamReader.read(n)` returns as soon as *some* data is there, so a single call would cut
    a large page at a chunk boundary (and it would then fail to parse); read to the end instead.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)
