"""The aligner's data plane: one object every transport calls (REST, gRPC, vLLM-compatible).

Covers answering a transport's ``FuseCall`` with one ``FuseAnswer`` (metadata and blocks) and
counting the request (``answer``; transports only convert), validating a fuse query (texts, k,
preset, option overrides, teacher subset) into ``InvalidRequest`` naming the field, admission
control (``Overloaded`` past
``max_inflight_blocks``), the two cache levels (fused blocks, then each teacher's raw scores),
computing identical concurrent blocks once, asking all teachers concurrently (one Score call per
teacher for all of a request's missing texts), fusing each block with the core in a worker
thread, each teacher's status (a frozen ``TeacherStatus``), and turning the pool's teacher-level
faults into the request errors they mean (``faults.request_errors``).

Leaves out: transport encoding (``rest``, ``grpc_api``, ``openai_api``) and teacher connections
(``pool``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from fuseserve.aligner.alignment import AlignMethod
from fuseserve.aligner.idstext import adds_prefix_space, text_of_ids
from fuseserve.aligner.options import PRESETS, FusionOptions, VocabAlign
from fuseserve.aligner.pipeline import TeacherInput, fuse_block
from fuseserve.aligner.service.cache import Cache, SingleFlight, fused_key, scores_key
from fuseserve.aligner.service.faults import request_errors
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.aligner.service.pool import Load, TeacherHandle, TeacherPool
from fuseserve.aligner.service.settings import AlignerSettings
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.errors import InvalidRequest, Overloaded, Unavailable
from fuseserve.wire.codec import CodecError
from fuseserve.wire.descriptions import TeacherStatus
from fuseserve.wire.messages import FusedBlock, TeacherScores
from fuseserve.wire.requests import FuseCall

SELF = "(aligner)"  # the shed metric's label when this process, not a teacher, is behind

T = TypeVar("T")


@dataclass(frozen=True)
class FuseQuery:
    """A validated request: texts plus everything that decides the answer."""

    texts: tuple[str, ...]
    k: int
    options: FusionOptions
    # the teachers asked, picked once (``TeacherPool.pick``), in the order the request named them
    handles: tuple[TeacherHandle, ...]
    # target ids given instead of texts ([n_i] int64 each); ``texts`` is filled from them when
    # the query is answered
    token_ids: tuple[np.ndarray, ...] | None = None
    # admission: the backlog (seconds, at the measured rates) this request may wait behind, and
    # the setting that says so (named in a refusal)
    horizon_s: float = 30.0
    horizon_setting: str = "request_deadline_s"

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.handles)

    @property
    def size(self) -> int:
        """Blocks asked for."""
        return len(self.token_ids) if self.token_ids is not None else len(self.texts)


@dataclass(frozen=True)
class BlockResult:
    """One answered block. offsets: [n, 2] character offsets of the target tokens in ``text``."""

    text: str
    offsets: np.ndarray
    block: FusedBlock
    source: str  # "hit" (fused cache), "shared" (computed for a concurrent caller), "computed"

    @property
    def cache_hit(self) -> bool:
        return self.block.cache_hit


@dataclass(frozen=True)
class FuseAnswer:
    """A fuse request's whole answer: what decided it (the target tokenizer's fingerprint, k,
    the resolved options, the teachers) and its blocks, in request order. Transports convert
    it; they add nothing but their own encoding."""

    target_fingerprint: str
    k: int
    options: FusionOptions
    teachers: tuple[str, ...]
    blocks: list[BlockResult]


@dataclass(frozen=True)
class _Target:
    ids: np.ndarray  # [n]
    offsets: np.ndarray  # [n, 2]
    # ids given that are not the tokenizer's own for their text: part of the fused cache key
    key_ids: bytes | None = None


def validation_field(exc: ValidationError, prefix: str) -> tuple[str, str]:
    """The first error of a pydantic ValidationError as (dotted field, message)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    return (f"{prefix}.{loc}" if loc else prefix), err.get("msg", str(exc))


def check_text(text: object, field: str, max_chars: int, max_bytes: int) -> None:
    """A text the service can tokenise: a non-empty string of valid Unicode within the size
    limits. Cheap (no tokenising), so a huge or broken text costs microseconds, not seconds."""
    if not isinstance(text, str) or not text:
        raise InvalidRequest(field, "must be a non-empty string")
    if len(text) > max_chars:
        raise InvalidRequest(field, f"{len(text)} characters exceed max_text_chars={max_chars}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            field,
            f"not valid Unicode: {exc.reason} (U+{ord(text[exc.start]):04X} at character "
            f"{exc.start}); send UTF-8 text without lone surrogates",
        ) from None
    if size > max_bytes:
        raise InvalidRequest(field, f"{size} UTF-8 bytes exceed max_text_bytes={max_bytes}")


def check_token_ids(
    rows: object,
    vocab_size: int,
    max_texts: int,
    max_tokens: int,
    min_tokens: int = 2,
    texts_setting: str = "max_texts",
) -> tuple[np.ndarray, ...]:
    """Target id sequences as [n_i] int64 arrays: 1..``max_texts`` lists (the setting named
    ``texts_setting``) of ``min_tokens``..``max_tokens`` ints in ``[0, vocab_size)``; else
    ``InvalidRequest`` naming ``token_ids[i][j]``."""
    if not isinstance(rows, Sequence) or isinstance(rows, str | bytes) or not rows:
        raise InvalidRequest("token_ids", "must hold at least one list of token ids")
    if len(rows) > max_texts:
        message = f"{len(rows)} sequences exceed {texts_setting}={max_texts}"
        raise InvalidRequest("token_ids", message)
    out = []
    for i, row in enumerate(rows):
        field = f"token_ids[{i}]"
        if not isinstance(row, Sequence | np.ndarray) or isinstance(row, str | bytes):
            raise InvalidRequest(field, "must be a list of token ids")
        if not min_tokens <= len(row) <= max_tokens:
            raise InvalidRequest(
                field,
                f"{len(row)} ids: needs {min_tokens} to max_block_tokens={max_tokens} target ids",
            )
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidRequest(f"{field}[{j}]", f"must be an integer token id, got {value!r}")
            if not 0 <= value < vocab_size:
                raise InvalidRequest(
                    f"{field}[{j}]",
                    f"id {value} is outside the target vocabulary [0, {vocab_size})",
                )
        out.append(np.asarray(row, dtype=np.int64))
    return tuple(out)


class FusionService:
    """The data plane over ``settings`` (read where each is used: a new setting needs no
    plumbing), the target tokenizer and its view, the teacher pool, the cache and the metrics."""

    def __init__(
        self,
        settings: AlignerSettings,
        target_tokenizer,
        target_view: TokenizerView,
        pool: TeacherPool,
        cache: Cache,
        metrics: AlignerMetrics,
    ) -> None:
        self.settings = settings
        self.tokenizer = target_tokenizer
        self.target = target_view
        self.pool = pool
        self.cache = cache
        self.metrics = metrics
        # one thread tokenises (a fast tokenizer must not be called from two threads at once);
        # the event loop stays free for health checks and other requests meanwhile
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.load = Load()  # this process's blocks in flight and rate: admission covers its CPU
        self.flights = SingleFlight()

    # ------------------------------------------------------------------ readiness
    @property
    def ready(self) -> bool:
        return self.pool.ready

    def teacher_statuses(self) -> list[TeacherStatus]:
        return self.pool.statuses()

    def problems(self) -> dict[str, str]:
        return {s.name: s.problem or "" for s in self.pool.statuses() if not s.ready}

    def query_options_json(self) -> str:
        """The service's default FusionOptions as JSON."""
        return FusionOptions.preset(self.settings.preset, **self.settings.options).model_dump_json()

    # ------------------------------------------------------------------ answering
    async def answer(self, call: FuseCall, transport: str, streamed: bool = False) -> FuseAnswer:
        """Validate and answer one request of ``transport`` (counted in the request metrics)."""
        (answer,) = await self.answer_all([call], transport, streamed)
        return answer

    async def answer_all(
        self, calls: Sequence[FuseCall], transport: str, streamed: bool = False
    ) -> list[FuseAnswer]:
        """Answer the queries of one request of ``transport`` (the vLLM-compatible route
        splits its prompts into several of at most ``max_texts``) concurrently; counted once:
        ``requests_total{outcome="ok"}`` and its latency (not for a FuseStream request, which
        waits on the stream's flow control), or ``outcome="cancelled"`` when the caller left or
        its deadline passed. Errors are counted where each transport answers them."""
        start = time.perf_counter()
        try:
            queries = [self.query_of(call, streamed) for call in calls]
            if len(queries) == 1:  # no task to make
                answers = [await self._answer(queries[0])]
            else:
                answers = await asyncio.gather(*(self._answer(query) for query in queries))
        except asyncio.CancelledError:
            self.metrics.requests.labels(transport, "cancelled").inc()
            raise
        self.metrics.requests.labels(transport, "ok").inc()
        if not streamed:
            self.metrics.request_latency.labels(transport).observe(time.perf_counter() - start)
        return list(answers)

    async def _answer(self, query: FuseQuery) -> FuseAnswer:
        blocks = await self.fuse(query)
        return FuseAnswer(self.target.fingerprint, query.k, query.options, query.teachers, blocks)

    def query_of(self, call: FuseCall, streamed: bool = False) -> FuseQuery:
        """The validated query of a transport's request."""
        return self.query(
            call.texts, call.k, call.preset, call.options, call.teachers, call.token_ids, streamed
        )

    # ------------------------------------------------------------------ validation
    def query(
        self,
        texts: Sequence[str] | None,
        k: int | None = None,
        preset: str | None = None,
        options: dict[str, Any] | None = None,
        teachers: Sequence[str] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        streamed: bool = False,
    ) -> FuseQuery:
        """A validated query of ``texts``, or of target ``token_ids`` (exactly one of them);
        ``streamed``: from a FuseStream (a trainer keeping blocks in flight, admitted within
        ``request_deadline_s``), else interactive (``interactive_deadline_s``)."""
        ids: tuple[np.ndarray, ...] | None = None
        if token_ids is not None:
            if texts:
                raise InvalidRequest("token_ids", "give exactly one of texts and token_ids")
            ids = check_token_ids(
                token_ids,
                self.target.vocab_size,
                self.settings.max_texts,
                self.settings.max_block_tokens,
            )
            texts = ()
        else:
            self._check_texts(texts)
        preset = preset or self.settings.preset
        if preset not in PRESETS:
            raise InvalidRequest("preset", f"unknown preset {preset!r}; choose {sorted(PRESETS)}")
        try:
            resolved = FusionOptions.preset(preset, **{**self.settings.options, **(options or {})})
        except ValidationError as exc:
            raise InvalidRequest(*validation_field(exc, "options")) from exc
        names = tuple(teachers) if teachers else self.pool.names
        if len(set(names)) != len(names):
            raise InvalidRequest("teachers", f"duplicate names in {list(names)}")
        with request_errors():
            handles = self.pool.pick(names)
        not_ready = [h for h in handles if not h.ready]
        if not_ready:
            raise Unavailable("; ".join(h.why for h in not_ready))
        k = self.settings.k if k in (None, 0) else k
        max_k = min(h.max_k for h in handles)
        if not 1 <= k <= max_k:
            raise InvalidRequest("k", f"must be in [1, {max_k}] (the teachers' limit), got {k}")
        horizon_s, setting = self.horizon(streamed)
        return FuseQuery(
            tuple(texts or ()), k, resolved, handles, ids,
            horizon_s=horizon_s, horizon_setting=setting,
        )  # fmt: skip

    def horizon(self, streamed: bool) -> tuple[float, str]:
        """(seconds of backlog a request may wait behind, the setting that says so)."""
        settings = self.settings
        if streamed:
            return settings.request_deadline_s, "request_deadline_s"
        interactive = min(settings.interactive_deadline_s, settings.request_deadline_s)
        return interactive, "interactive_deadline_s"

    def _check_texts(self, texts: Sequence[str] | None) -> None:
        settings = self.settings
        if texts is None or isinstance(texts, str) or not texts:
            raise InvalidRequest("texts", "must hold at least one text")
        if len(texts) > settings.max_texts:
            raise InvalidRequest(
                "texts", f"{len(texts)} texts exceed max_texts={settings.max_texts}"
            )
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]", settings.max_text_chars, settings.max_text_bytes)

    def tokenize_target(self, text: str, field: str) -> _Target:
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        n = len(enc["input_ids"])
        if n > self.settings.max_block_tokens:
            raise InvalidRequest(
                field, f"{n} target tokens exceed max_block_tokens={self.settings.max_block_tokens}"
            )
        if n < 2:
            raise InvalidRequest(field, "needs at least 2 target tokens (one next-token label)")
        return _Target(
            np.asarray(enc["input_ids"], dtype=np.int64),
            np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2),
        )

    @cached_property
    def prefix_space(self) -> bool:
        """Whether the target tokenizer adds SentencePiece's dummy-prefix space."""
        return adds_prefix_space(self.tokenizer, self.target)

    def ids_target(self, ids: np.ndarray, field: str) -> tuple[str, _Target]:
        """The text target ``ids`` stand for, with their offsets. Ids that are the tokenizer's
        own for that text get exactly the text path's target (and cache key); other ids key
        the fused cache on themselves too."""
        recovered = text_of_ids(ids, self.target, self.prefix_space)
        if not recovered.text:
            raise InvalidRequest(field, "stands for no text (special tokens only)")
        check_text(
            recovered.text, field, self.settings.max_text_chars, self.settings.max_text_bytes
        )
        enc = self.tokenizer(recovered.text, return_offsets_mapping=True, add_special_tokens=False)
        if np.array_equal(np.asarray(enc["input_ids"], dtype=np.int64), ids):
            offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            return recovered.text, _Target(ids, offsets)
        key = ids.astype("<i4").tobytes()
        return recovered.text, _Target(ids, recovered.offsets, key)

    async def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The target tokenizer's ids of ``texts`` (its special tokens added as it does by
        default), in the tokenizer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenize, lambda: [list(self.tokenizer(t)["input_ids"]) for t in texts]
        )

    def _targets(self, query: FuseQuery) -> tuple[tuple[str, ...], list[_Target]]:
        """Every block's text and target tokens (runs in the tokenizer's thread)."""
        if query.token_ids is None:
            targets = [self.tokenize_target(t, f"texts[{i}]") for i, t in enumerate(query.texts)]
            return query.texts, targets
        pairs = [self.ids_target(ids, f"token_ids[{i}]") for i, ids in enumerate(query.token_ids)]
        return tuple(text for text, _ in pairs), [target for _, target in pairs]

    # ------------------------------------------------------------------ fusing
    async def fuse(self, query: FuseQuery) -> list[BlockResult]:
        """Answer every block of a validated query, in order."""
        n = query.size
        # shed before any work (tokenising, cache look-ups) while the teachers or this
        # process are behind
        self._admit(query, n)
        full = self._no_slots(n)
        if full is not None:
            raise full
        ahead = self.load.start(n)
        self.metrics.inflight.set(self.inflight)
        start, answered = time.perf_counter(), False
        try:
            loop = asyncio.get_running_loop()
            texts, targets = await loop.run_in_executor(self._tokenize, self._targets, query)
            query = dataclasses.replace(query, texts=texts)
            with self.cache.request_budget():  # a slow or hung cache costs one timeout at most
                results = await self._fuse(query, targets)
            answered = True
            return results
        finally:
            # only answers measure the rate (a fast failure says nothing about capacity)
            self.load.finish(n, ahead if answered else None, time.perf_counter() - start)
            self.metrics.inflight.set(self.inflight)

    @property
    def inflight(self) -> int:
        """Blocks admitted and not answered yet."""
        return self.load.inflight

    def _no_slots(self, n: int) -> Overloaded | None:
        """The refusal when ``n`` more blocks would pass ``max_inflight_blocks``."""
        if self.inflight + n <= self.settings.max_inflight_blocks:
            return None
        return Overloaded(
            f"{self.inflight} blocks in flight (max_inflight_blocks="
            f"{self.settings.max_inflight_blocks}); retry later"
        )

    def _fused_key(self, query: FuseQuery, text: str, ids: bytes | None = None) -> str:
        prints = [f"{h.name}={h.fingerprint}" for h in query.handles]
        options = query.options.cache_key()
        return fused_key(self.target.fingerprint, prints, query.k, options, text, ids)

    async def _fuse(self, query: FuseQuery, targets: list[_Target]) -> list[BlockResult]:
        keys = [self._fused_key(query, t, g.key_ids) for t, g in zip(query.texts, targets)]
        cached = await asyncio.gather(*(self.cache.get(key) for key in keys))
        results: list[BlockResult | None] = [None] * len(keys)
        waits: dict[int, asyncio.Future] = {}
        owned: list[int] = []
        for i, (key, value) in enumerate(zip(keys, cached)):
            block = self._decode_fused(value, targets[i], query)
            if block is not None:
                results[i] = BlockResult(query.texts[i], targets[i].offsets, block, "hit")
                continue
            future, owner = self.flights.claim(key)
            if owner:
                owned.append(i)
            else:
                waits[i] = future
        if owned:
            try:  # every claimed block is resolved, whatever happens: else its waiters hang
                # the teachers again, for the blocks they must compute (this process: once)
                self._admit(query, len(owned), this_process=False)
                computed = await self._compute(query, [targets[i] for i in owned], owned)
            except BaseException as exc:
                for i in owned:
                    self.flights.resolve(keys[i], error=exc)
                raise
            for i, block in zip(owned, computed):
                self.flights.resolve(keys[i], block)
                results[i] = BlockResult(query.texts[i], targets[i].offsets, block, "computed")
            await asyncio.gather(
                *(self.cache.set(keys[i], block.to_bytes()) for i, block in zip(owned, computed))
            )
        for i, future in waits.items():
            block = await asyncio.shield(future)
            results[i] = BlockResult(query.texts[i], targets[i].offsets, block, "shared")
        done = _filled(results, "fused blocks")
        for r in done:
            self.metrics.blocks.labels(r.source).inc()
        return done

    def _admit(self, query: FuseQuery, n: int, this_process: bool = True) -> None:
        """Admit ``n`` blocks only if every teacher they need, and this process, can answer them
        within the query's horizon at the rate each has been answering (idle ones always may).
        """
        horizon = (query.horizon_s, query.horizon_setting)
        waits = {h: h.load.wait_s(n) for h in query.handles}
        handle, wait = max(waits.items(), key=lambda kv: kv[1])
        if wait > query.horizon_s:
            raise self._shed(handle.name, handle.load, n, wait, horizon)
        wait = self.load.wait_s(n) if this_process else 0.0
        if wait > query.horizon_s:
            raise self._shed(SELF, self.load, n, wait, horizon)

    def refusal_before_parsing(self, every_teacher: bool = False) -> Overloaded | None:
        """The 429 for a request, decided before its body is parsed: every block slot is taken,
        or this process could not answer one more block within ``request_deadline_s``, or the
        teachers could not (``every_teacher``: the request needs them all, so any one behind is
        enough; else it might name a subset, so only all of them behind is). None when the
        request might be admitted."""
        full = self._no_slots(1)
        if full is not None:
            return full
        horizon = self.horizon(streamed=False)
        wait = self.load.wait_s(1)
        if wait > horizon[0]:
            return self._shed(SELF, self.load, 1, wait, horizon)
        loads = self.pool.loads()
        waits = {name: load.wait_s(1) for name, load in loads.items()}
        if not waits:
            return None
        pick = max if every_teacher else min
        name, wait = pick(waits.items(), key=lambda kv: kv[1])
        if wait > horizon[0]:
            return self._shed(name, loads[name], 1, wait, horizon)
        return None

    def _shed(
        self, name: str, load: Load, n: int, wait: float, horizon: tuple[float, str]
    ) -> Overloaded:
        self.metrics.shed.labels(name).inc()
        who = "the aligner" if name == SELF else f"teacher {name!r}"
        seconds, setting = horizon
        return Overloaded(
            f"{who} has {load.inflight} blocks in flight at "
            f"{load.rate:.2f} blocks/s: {n} more would take {wait:.1f}s, over "
            f"{setting}={seconds:g}; retry later",
            retry_after_s=wait - seconds,
        )

    def _decode_fused(self, value: bytes | None, target: _Target, query: FuseQuery):
        if value is None:
            self.metrics.cache_lookups.labels("fused", "miss").inc()
            return None
        try:
            block = FusedBlock.from_bytes(value)
            if block.teachers != query.teachers or not np.array_equal(block.target_ids, target.ids):
                raise CodecError("cached block is for other tokens or teachers")
        except CodecError:
            self.metrics.cache_lookups.labels("fused", "corrupt").inc()
            return None
        self.metrics.cache_lookups.labels("fused", "hit").inc()
        return dataclasses.replace(block, cache_hit=True)

    async def _compute(
        self, query: FuseQuery, targets: list[_Target], indices: list[int]
    ) -> list[FusedBlock]:
        with request_errors():
            return await self._compute_blocks(query, targets, indices)

    async def _compute_blocks(
        self, query: FuseQuery, targets: list[_Target], indices: list[int]
    ) -> list[FusedBlock]:
        texts = [query.texts[i] for i in indices]
        # one teacher failing cancels the others' calls (and so their queued work)
        try:
            async with asyncio.TaskGroup() as group:
                calls = [
                    group.create_task(self._teacher_scores(handle, texts, query.k))
                    for handle in query.handles
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        per_teacher = [call.result() for call in calls]
        cooc = query.options.vocab is VocabAlign.COOC
        maps = [await h.map_for(query.options.strings, cooc) for h in query.handles]
        tables: list = [None] * len(query.handles)
        if query.options.alignment is AlignMethod.SPANS:
            tables = [await h.continuation_table() for h in query.handles]
        views = [h.tokenizer() for h in query.handles]
        blocks = []
        for j, (text, target) in enumerate(zip(texts, targets)):
            inputs = [
                TeacherInput(h.name, view, vmap, s[j], table)
                for h, view, vmap, table, s in zip(query.handles, views, maps, tables, per_teacher)
            ]
            start = time.perf_counter()
            block = await asyncio.to_thread(
                fuse_block, text, self.target, target.ids, target.offsets, inputs, query.options
            )
            self.metrics.fuse_seconds.observe(time.perf_counter() - start)
            blocks.append(block)
        return blocks

    async def _teacher_scores(
        self, handle: TeacherHandle, texts: list[str], k: int
    ) -> list[TeacherScores]:
        """One teacher's scores of ``texts``: cached where possible, one call for the rest."""
        dtype = handle.float_dtype
        keys = [scores_key(handle.fingerprint, k, dtype, text) for text in texts]
        values = await asyncio.gather(*(self.cache.get(key) for key in keys))
        out: list[TeacherScores | None] = []
        for value in values:
            scores = None
            if value is not None:
                try:
                    scores = TeacherScores.from_bytes(value)
                    if scores.k != k:
                        raise CodecError("cached scores for another k")
                except CodecError:
                    scores = None
                    self.metrics.cache_lookups.labels("scores", "corrupt").inc()
            if value is None:
                self.metrics.cache_lookups.labels("scores", "miss").inc()
            elif scores is not None:
                self.metrics.cache_lookups.labels("scores", "hit").inc()
            out.append(scores)
        missing = [i for i, s in enumerate(out) if s is None]
        if missing:
            fresh = await handle.score([texts[i] for i in missing], k)
            for i, scores in zip(missing, fresh):
                out[i] = scores
            await asyncio.gather(
                *(self.cache.set(keys[i], s.to_bytes(dtype)) for i, s in zip(missing, fresh))
            )
        return _filled(out, f"scores of teacher {handle.name!r}")


def _filled(items: Sequence[T | None], what: str) -> list[T]:
    """``items``, every slot of which the caller has filled (an empty slot is a bug here)."""
    filled = [item for item in items if item is not None]
    if len(filled) != len(items):
        raise RuntimeError(f"{what}: {len(items) - len(filled)} of {len(items)} left unfilled")
    return filled
