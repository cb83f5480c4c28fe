"""The REST transport of the client: ``POST /v1/fuse`` and friends, sync and async (httpx).

Covers asking for the binary answer (``Accept: application/vnd.fuseserve.fused``, the default)
or JSON, the bearer key (argument, else ``FUSESERVE_CLIENT_API_KEY``), a deadline on every call,
and turning either answer, or an error envelope, into ``FuseReply`` / ``FuseError``.

Leaves out: retries (a 429 carries ``retry_after_s``; the caller decides) and gRPC.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import httpx

from fuseserve.client.params import (
    FuseParams,
    call_texts,
    compact_reply,
    reply_from_json,
    rest_error,
)
from fuseserve.wire.fuse_reply import MEDIA_TYPE, FuseReply, decode_reply

DEFAULT = FuseParams()


class _RestBase:
    """``binary``: ask for the binary answer (else JSON); ``timeout_s``: the deadline of each
    call; ``verify``: TLS verification (a CA file, or False)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        binary: bool = True,
        timeout_s: float = 60.0,
        verify: str | bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.binary = binary
        self.timeout_s = timeout_s
        key = api_key if api_key is not None else os.environ.get("FUSESERVE_CLIENT_API_KEY")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = self._open(
            base_url=self.base_url, headers=headers, timeout=timeout_s, verify=verify
        )

    def _open(self, **kwargs):
        raise NotImplementedError

    def _request(
        self, texts, params: FuseParams, binary: bool | None, token_ids=None
    ) -> dict[str, Any]:
        texts = call_texts(texts, token_ids)
        binary = self.binary if binary is None else binary
        accept = MEDIA_TYPE if binary else "application/json"
        return {"json": params.rest_body(texts, token_ids), "headers": {"accept": accept}}

    @staticmethod
    def _reply(response: httpx.Response) -> FuseReply:
        if response.status_code != 200:
            raise rest_error(response.status_code, response.headers, response.content)
        if response.headers.get("content-type", "").startswith(MEDIA_TYPE):
            return compact_reply(decode_reply(response.content))
        return compact_reply(reply_from_json(response.json()))

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise rest_error(response.status_code, response.headers, response.content)
        return response.json()


class RestClient(_RestBase):
    """Sync REST client."""

    def _open(self, **kwargs) -> httpx.Client:
        return httpx.Client(**kwargs)

    def fuse(
        self,
        texts: str | Sequence[str] | None = None,
        params: FuseParams = DEFAULT,
        binary: bool | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> FuseReply:
        """Fused blocks for ``texts`` (one block per text), or for target ``token_ids`` (one
        block per list of ids; exactly one of the two), cut as ``params`` says."""
        request = self._request(texts, params, binary, token_ids)
        return self._reply(self._http.post("/v1/fuse", **request))

    def teachers(self) -> list[dict[str, Any]]:
        return self._json(self._http.get("/v1/teachers"))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRestClient(_RestBase):
    """Async REST client; the same arguments as ``RestClient``."""

    def _open(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(**kwargs)

    async def fuse(
        self,
        texts: str | Sequence[str] | None = None,
        params: FuseParams = DEFAULT,
        binary: bool | None = None,
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> FuseReply:
        """As ``RestClient.fuse``."""
        request = self._request(texts, params, binary, token_ids)
        return self._reply(await self._http.post("/v1/fuse", **request))

    async def teachers(self) -> list[dict[str, Any]]:
        return self._json(await self._http.get("/v1/teachers"))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRestClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
