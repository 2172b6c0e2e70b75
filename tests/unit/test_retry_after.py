"""A temporary failure (the index or blob store failing over) is answered 503 with ``Retry-After``; a permanent one
without it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.dicomweb.routes import guarded
from bastion.errors import BastionError, IndexFailure, NotFound, StorageError


@pytest.mark.parametrize(("error", "status", "retry_after"), [
    (IndexFailure("index unreachable"), 503, "5"),
    (StorageError("blob store unreachable"), 503, "5"),
    (NotFound("no such study"), 404, None),
])
def test_temporary_failures_say_when_to_retry(error: BastionError, status: int, retry_after: str | None) -> None:
    @guarded
    async def failing(request: Request) -> Response:
        raise error

    async def get() -> httpx.Response:
        app = Starlette(routes=[Route("/x", failing)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/x")

    response = asyncio.run(get())
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.json()["error"] == error.message
