"""The aligner's teachers: connections, vocabularies, vocabulary maps, and resilient scoring.

Covers, per teacher: one client per replica address (round-robin; a headless Kubernetes Service
gives one address per pod), waiting for the teacher at start-up, reading Info and the vocabulary,
building or loading the vocabulary map onto the target, a cache fingerprint (model id, revision,
tokenizer fingerprint, dtype, backend), Score with a deadline per call and retries with
exponential backoff on UNAVAILABLE (RESOURCE_EXHAUSTED moves once to another replica), detecting
a teacher whose tokenizer changed (``refresh``): its map is rebuilt before it is used again, and
a frozen ``TeacherStatus`` per teacher. Failures are teacher-level faults (``faults``).

Leaves out: caching and fusion, and which request field a fault concerns (``dataplane``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fuseserve.aligner.alignment import AlignMethod
from fuseserve.aligner.continuation import ContinuationTable, FirstTokens
from fuseserve.aligner.service.faults import (
    MapMissing,
    TeacherFault,
    TeacherOverloaded,
    TeacherRejected,
    TeacherUnavailable,
    UnknownTeacher,
)
from fuseserve.aligner.service.settings import AlignerSettings
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.aligner.vocabmap import StringMode, VocabMap
from fuseserve.aligner.vocabmap_store import VocabMapStore
from fuseserve.errors import DeadlineExceeded, InvalidRequest, Overloaded, ServiceError
from fuseserve.teacher.client import TeacherClient
from fuseserve.wire.descriptions import TeacherInfo, TeacherStatus
from fuseserve.wire.grpc_channel import channel_credentials
from fuseserve.wire.messages import TeacherScores

log = logging.getLogger(__name__)

# retried (with backoff) on the next replica: the teacher may be restarting. Never retried:
# RESOURCE_EXHAUSTED (an overloaded teacher gets no more of the same work; another replica may
# take it once) and DEADLINE_EXCEEDED (the caller's time is spent).
RETRYABLE = {"UNAVAILABLE"}


@dataclass
class Load:
    """What one teacher is doing for this aligner, to admit only work it can finish in time.

    ``inflight``: blocks sent and not answered. ``rate``: blocks per second it completes, an
    exponentially weighted mean of Little's-law samples (blocks ahead of and in a call, divided
    by the call's latency; the teacher works first come, first served)."""

    inflight: int = 0
    rate: float = 0.0
    alpha: float = 0.3

    def start(self, n: int) -> int:
        ahead = self.inflight
        self.inflight += n
        return ahead + n

    def finish(self, n: int, through: int | None = None, latency_s: float | None = None) -> None:
        self.inflight -= n
        if through and latency_s and latency_s > 0:
            sample = through / latency_s
            self.rate = sample if self.rate <= 0 else self.rate + self.alpha * (sample - self.rate)

    def wait_s(self, n: int) -> float:
        """Seconds until ``n`` more blocks would be answered (0 while idle or unmeasured)."""
        if self.inflight == 0 or self.rate <= 0:
            return 0.0
        return (self.inflight + n) / self.rate


@dataclass
class Teacher:
    """One teacher's state; ``ready`` once its vocabulary map onto the target is loaded."""

    name: str
    addresses: tuple[str, ...]
    clients: list[TeacherClient]
    view: TokenizerView | None = None
    vocab_map: VocabMap | None = None  # in the service's string mode
    other_maps: dict[str, VocabMap] = field(default_factory=dict)  # other modes, "cooc"
    continuations: ContinuationTable | None = None  # for `spans`: at start-up or first use
    info: TeacherInfo | None = None
    fingerprint: str = ""
    problem: str = "not connected yet"
    down: str = ""  # set by the health watch while no replica is SERVING
    load: Load = field(default_factory=Load)
    failed_checks: int = 0
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    # told after every change of readiness's inputs (the pool: the teacher_ready gauge)
    on_change: Callable[[Teacher], None] = field(default=lambda teacher: None)
    _next: int = 0

    @property
    def ready(self) -> bool:
        """The one readiness rule: a map onto the target, no problem, not down."""
        return self.vocab_map is not None and not self.problem and not self.down

    def mark(self, problem: str | None = None, down: str | None = None) -> None:
        """Set what keeps the teacher from being ready (None: unchanged; "": cleared) and tell
        ``on_change``. Every write of ``problem``, ``down`` and the map goes through here or
        ``loaded``."""
        if problem is not None:
            self.problem = problem
        if down is not None:
            self.down = down
        self.on_change(self)

    def loaded(
        self,
        info: TeacherInfo,
        view: TokenizerView,
        vocab_map: VocabMap,
        continuations: ContinuationTable | None = None,
    ) -> None:
        """Every replica answered Info just now and the map onto the target is there: ready.
        Another tokenizer than before drops the old one's other maps and table."""
        if view is not self.view:
            self.other_maps, self.continuations = {}, continuations
        self.info, self.view, self.vocab_map = info, view, vocab_map
        self.fingerprint, self.failed_checks = info.cache_fingerprint(), 0
        self.mark(problem="", down="")

    def handle(self, pool: TeacherPool) -> TeacherHandle:
        """This teacher as one request uses it (see ``TeacherHandle``)."""
        return TeacherHandle(
            self, pool, self.ready, self.why, self.max_k, self.fingerprint, self.view,
            self.vocab_map,
        )  # fmt: skip

    @property
    def why(self) -> str:
        """Why the teacher is not ready ("" when it is)."""
        if self.ready:
            return ""
        return self.problem or self.down or f"teacher {self.name!r} is not ready"

    @property
    def max_k(self) -> int:
        return min(self.info.max_k, self.view.vocab_size) if self.info and self.view else 0

    def status(self) -> TeacherStatus:
        info, view = self.info, self.view
        return TeacherStatus(
            name=self.name,
            addresses=self.addresses,
            ready=self.ready,
            problem=self.why or None,
            model_id=info.model_id if info else None,
            backend=info.backend if info else None,
            tokenizer_fingerprint=view.fingerprint if view else None,
            vocab_size=view.vocab_size if view else None,
            max_k=self.max_k,
            vocab_map_exact_fraction=self.vocab_map.exact_fraction if self.vocab_map else None,
        )

    def next_client(self) -> TeacherClient:
        """Round-robin over the replicas, skipping those the health watch saw down."""
        for _ in range(len(self.clients)):
            client = self.clients[self._next % len(self.clients)]
            self._next += 1
            if client.serving:
                return client
        return client


@dataclass(frozen=True, eq=False)
class TeacherHandle:
    """One teacher as one request uses it, picked once (``TeacherPool.pick``): whether it was
    ready (and why not), its top-k limit, its cache fingerprint, tokenizer view and map onto the
    target as they were when picked (a refresh meanwhile cannot mix two tokenizers in one
    answer), its live load, and its calls (``score``, ``map_for``, ``continuation_table``)."""

    teacher: Teacher
    pool: TeacherPool
    ready: bool
    why: str
    max_k: int
    fingerprint: str
    view: TokenizerView | None
    vocab_map: VocabMap | None  # in the service's string mode

    @property
    def name(self) -> str:
        return self.teacher.name

    @property
    def load(self) -> Load:
        return self.teacher.load

    @property
    def float_dtype(self) -> str:
        """The float width its scores are asked in (part of their cache key)."""
        return self.pool.float_dtype

    def tokenizer(self) -> TokenizerView:
        """The view picked; ``TeacherUnavailable`` when it had none."""
        if self.view is None:
            raise TeacherUnavailable(self.name, self.why)
        return self.view

    async def score(self, texts: list[str], k: int) -> list[TeacherScores]:
        """``TeacherPool.score`` on this teacher."""
        return await self.pool.score(self.teacher, texts, k)

    async def map_for(self, mode: StringMode, cooc: bool = False) -> VocabMap:
        """Its map onto the target in ``mode`` (in the service's own mode: the one picked)."""
        if not cooc and mode == self.pool.mode and self.vocab_map is not None:
            return self.vocab_map
        return await self.pool.vocab_map(self.teacher, mode, cooc)

    async def continuation_table(self) -> ContinuationTable:
        return await self.pool.continuation_table(self.teacher)


class TeacherPool:
    """The teachers of ``settings`` (read where each is used: the teachers and their
    addresses, the call deadline, retries and backoff, TLS and key, the payload float width,
    the vocabulary-map folder, the string mode and alignment of the service's options, the
    readiness policy), mapped onto ``target``; ``first_tokens``: the target tokenizer's, for
    continuation tables."""

    def __init__(
        self,
        settings: AlignerSettings,
        target: TokenizerView,
        metrics=None,
        first_tokens: FirstTokens | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.metrics = metrics
        self.first_tokens = first_tokens
        self.store = VocabMapStore(settings.vocab_map_dir)
        options = settings.fusion_options()
        self.mode = options.strings
        self.continuations_at_start = options.alignment is AlignMethod.SPANS
        self.teachers: dict[str, Teacher] = {
            e.name: Teacher(
                e.name, tuple(e.addresses), self._clients(e.addresses), on_change=self._publish
            )
            for e in settings.teachers
        }

    def _clients(self, addresses: Sequence[str]) -> list[TeacherClient]:
        """One client per replica, with the deadline, TLS and key the settings give."""
        s = self.settings
        tls = channel_credentials(s.teacher_tls_ca, s.teacher_tls_cert, s.teacher_tls_key)
        key = s.teacher_api_key.get_secret_value() if s.teacher_api_key else None
        return [
            TeacherClient(a, s.teacher_timeout_s, s.max_message_bytes, tls, key) for a in addresses
        ]

    @property
    def float_dtype(self) -> str:
        """The float width teachers answer in (part of the scores' cache key)."""
        return self.settings.teacher_float_dtype

    # ------------------------------------------------------------------ start-up and refresh
    async def start(self, timeout_s: float) -> None:
        """Wait for every teacher (Info on each replica), then load vocabularies and maps."""
        await asyncio.gather(*(self._connect(t, timeout_s) for t in self.teachers.values()))

    async def _connect(self, teacher: Teacher, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            try:
                await self._load(teacher)
                return
            except (ServiceError, TeacherFault) as exc:
                reason = str(exc)
                teacher.mark(problem=f"waiting for teacher {teacher.name!r}: {reason}")
                if time.monotonic() + delay > deadline:
                    raise TeacherUnavailable(
                        teacher.name,
                        f"teacher {teacher.name!r} at {', '.join(teacher.addresses)} did not "
                        f"become ready within {timeout_s:.0f}s: {reason}",
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _load(self, teacher: Teacher) -> None:
        infos = await asyncio.gather(*(c.info() for c in teacher.clients))
        prints = {i.tokenizer_fingerprint for i in infos}
        if len(prints) > 1:
            raise TeacherUnavailable(
                teacher.name,
                f"teacher {teacher.name!r}: replicas serve different tokenizers {sorted(prints)}",
            )
        info = infos[0]
        if teacher.view is not None and teacher.view.fingerprint == info.tokenizer_fingerprint:
            assert teacher.vocab_map is not None  # loaded together with the view
            teacher.loaded(info, teacher.view, teacher.vocab_map)
            return
        tokens = await teacher.clients[0].vocab()
        view = info.tokenizer(teacher.name, tokens, TokenizerView)
        if view.fingerprint != info.tokenizer_fingerprint:
            raise TeacherUnavailable(
                teacher.name,
                f"teacher {teacher.name!r}: vocabulary fingerprint {view.fingerprint} does not "
                f"match its Info {info.tokenizer_fingerprint}",
            )
        vocab_map = await asyncio.to_thread(
            self.store.get_or_build, view, self.target, self.mode, False
        )
        continuations = None
        if self.continuations_at_start:
            continuations = await asyncio.to_thread(
                self.store.get_or_build_continuations, view, self.target, self.first_tokens, False
            )
        teacher.loaded(info, view, vocab_map, continuations)
        log.info(
            "teacher %s ready: %s (%d tokens, %s), map %.1f%% exact",
            teacher.name,
            info.model_id,
            view.vocab_size,
            view.scheme,
            100 * vocab_map.exact_fraction,
        )

    def _publish(self, teacher: Teacher) -> None:
        """Readiness may have changed: the gauge follows."""
        if self.metrics is not None:
            self.metrics.teacher_ready.labels(teacher.name).set(1.0 if teacher.ready else 0.0)

    async def refresh(self) -> None:
        """Re-read every teacher's Info; a changed tokenizer gets its map rebuilt before reuse."""
        for teacher in self.teachers.values():
            async with teacher.reloading:
                try:
                    infos = await asyncio.gather(*(c.info() for c in teacher.clients))
                except ServiceError:
                    continue  # a down teacher shows up as 503 on use; nothing to re-check
                if teacher.view is None or any(
                    i.tokenizer_fingerprint != teacher.view.fingerprint for i in infos
                ):
                    old = teacher.view.fingerprint if teacher.view else "none"
                    teacher.mark(
                        problem=f"teacher {teacher.name!r} changed its tokenizer "
                        f"({old} -> {infos[0].tokenizer_fingerprint}); rebuilding its map"
                    )
                    log.warning(teacher.problem)
                    try:
                        await self._load(teacher)
                    except (ServiceError, TeacherFault) as exc:
                        teacher.mark(problem=f"teacher {teacher.name!r}: {exc}")

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:  # keep refreshing; one bad round must not end the loop
                log.exception("teacher refresh failed")

    # ------------------------------------------------------------------ health
    async def watch_health(
        self, interval_s: float, failures: int = 2, on_change=lambda: None
    ) -> None:
        """Check every replica's grpc.health.v1 status each ``interval_s``: a teacher none of
        whose replicas is SERVING for ``failures`` rounds in a row (one round when every
        replica refuses the connection) is down (not ready, requests
        asking for it fail at once with 503 / UNAVAILABLE naming it); back when one serves again
        (its Info is read again first: a restarted teacher may have another tokenizer)."""
        while True:
            before = {n: t.ready for n, t in self.teachers.items()}
            await asyncio.gather(
                *(self._check(t, interval_s, failures) for t in self.teachers.values())
            )
            if before != {n: t.ready for n, t in self.teachers.items()}:
                on_change()
            await asyncio.sleep(interval_s)

    async def _check(self, teacher: Teacher, interval_s: float, failures: int) -> None:
        if teacher.vocab_map is None:
            return  # still connecting: start() and refresh() own it
        timeout = max(1.0, interval_s)
        problems = await asyncio.gather(*(c.health(timeout) for c in teacher.clients))
        for client, problem in zip(teacher.clients, problems):
            client.serving = problem is None
        if any(p is None for p in problems):
            teacher.failed_checks = 0
            if teacher.down:
                async with teacher.reloading:
                    try:
                        await self._load(teacher)
                    except (ServiceError, TeacherFault) as exc:
                        teacher.mark(down=f"teacher {teacher.name!r} is back but failed: {exc}")
                        return
                    log.info("teacher %s serves again", teacher.name)
            return
        teacher.failed_checks += 1
        # refused connections (a dead process) are certain at once; a slow or NOT_SERVING
        # answer must repeat ``failures`` times
        certain = all(p == "UNAVAILABLE" for p in problems)
        if (certain or teacher.failed_checks >= failures) and not teacher.down:
            where = ", ".join(f"{c.address}: {p}" for c, p in zip(teacher.clients, problems))
            teacher.mark(down=f"teacher {teacher.name!r} is not serving ({where})")
            log.warning(teacher.down)

    # ------------------------------------------------------------------ scoring
    def get(self, name: str) -> Teacher:
        teacher = self.teachers.get(name)
        if teacher is None:
            raise UnknownTeacher(name, f"unknown teacher {name!r}; known: {list(self.teachers)}")
        return teacher

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.teachers)

    def pick(self, names: Sequence[str]) -> tuple[TeacherHandle, ...]:
        """The handles one request uses, picked once (``UnknownTeacher`` for a name nobody
        configured)."""
        return tuple(self.get(name).handle(self) for name in names)

    def statuses(self) -> list[TeacherStatus]:
        return [t.status() for t in self.teachers.values()]

    def loads(self) -> dict[str, Load]:
        """Every teacher's live load, by name."""
        return {name: t.load for name, t in self.teachers.items()}

    @property
    def ready(self) -> bool:
        """The readiness policy: at least ``min_ready`` teachers ready (0: every teacher)."""
        wanted = self.settings.ready_min_teachers or len(self.teachers)
        return bool(self.teachers) and self.ready_count >= min(wanted, len(self.teachers))

    @property
    def ready_count(self) -> int:
        return sum(t.ready for t in self.teachers.values())

    async def _refined_map(self, teacher: Teacher) -> VocabMap:
        if teacher.view is None:
            raise TeacherUnavailable(teacher.name, teacher.why)
        vmap = teacher.other_maps.get("cooc")
        if vmap is None:
            vmap = await asyncio.to_thread(
                self.store.load, teacher.view, self.target, StringMode.SURFACE, True
            )
            if vmap is None:
                raise MapMissing(
                    teacher.name,
                    f"no co-occurrence map for teacher {teacher.name!r} in {self.store.directory}; "
                    "build one with `fuseserve vocab-map --cooc-corpus FILES`",
                )
            teacher.other_maps["cooc"] = vmap
        return vmap

    async def continuation_table(self, teacher: Teacher) -> ContinuationTable:
        """The teacher's continuation table onto the target (built or loaded once)."""
        if teacher.continuations is not None:
            return teacher.continuations
        async with teacher.reloading:
            if teacher.continuations is None:
                view = teacher.view
                if view is None:
                    raise TeacherUnavailable(teacher.name, teacher.why)
                table = await asyncio.to_thread(
                    self.store.get_or_build_continuations,
                    view,
                    self.target,
                    self.first_tokens,
                    False,
                )
                if teacher.view is view:
                    teacher.continuations = table
                return table
            return teacher.continuations

    async def vocab_map(self, teacher: Teacher, mode: StringMode, cooc: bool = False) -> VocabMap:
        """The teacher's map onto the target in ``mode``: the service's own mode is loaded at
        start-up; another mode (a request asking for another preset) is built or loaded from the
        store on first use, once. ``cooc``: the co-occurrence refined map, which must have been
        built beforehand (``fuseserve vocab-map --cooc-corpus``)."""
        if cooc:
            return await self._refined_map(teacher)
        if mode == self.mode or teacher.vocab_map is None:
            if teacher.vocab_map is None:
                raise TeacherUnavailable(teacher.name, teacher.why)
            return teacher.vocab_map
        async with teacher.reloading:
            vmap = teacher.other_maps.get(mode)
            if vmap is None:
                view = teacher.view
                if view is None:
                    raise TeacherUnavailable(teacher.name, teacher.why)
                vmap = await asyncio.to_thread(
                    self.store.get_or_build, view, self.target, mode, False
                )
                if teacher.view is view:  # not replaced by a tokenizer change meanwhile
                    teacher.other_maps[mode] = vmap
            return vmap

    async def score(self, teacher: Teacher, texts: list[str], k: int) -> list[TeacherScores]:
        """Score texts on one teacher (truncating at its max length). UNAVAILABLE is retried
        with backoff on the next replica; RESOURCE_EXHAUSTED moves once to another replica if
        there is one, else it is ``TeacherOverloaded`` at once; nothing else is retried."""
        name = teacher.name
        if not teacher.ready:
            raise TeacherUnavailable(name, teacher.why)
        delay, retries = self.settings.teacher_backoff_s, self.settings.teacher_retries
        exhausted: set[str] = set()
        attempt = 0
        while True:
            client = teacher.next_client()
            where = f"teacher {name!r} at {client.address}"
            try:
                return await self._score_once(teacher, client, texts, k)
            except InvalidRequest as exc:
                raise TeacherRejected(name, f"teacher {name!r}: {exc}", exc.field) from exc
            except Overloaded as exc:
                exhausted.add(client.address)
                if len(exhausted) < len(teacher.clients) and attempt < retries:
                    attempt += 1
                    continue  # another replica, at once
                raise TeacherOverloaded(
                    name, f"{where} is overloaded: {exc}", exc.retry_after_s
                ) from exc
            except DeadlineExceeded as exc:
                message = f"{where} did not answer within {client.timeout_s:g}s"
                raise TeacherUnavailable(name, message) from exc
            except ServiceError as exc:
                if exc.remote_status not in RETRYABLE or attempt >= retries:
                    raise TeacherUnavailable(name, f"{where}: {exc.remote_status} {exc}") from exc
            attempt += 1
            await asyncio.sleep(delay)
            delay *= 2

    async def _score_once(
        self, teacher: Teacher, client: TeacherClient, texts: list[str], k: int
    ) -> list[TeacherScores]:
        """One Score call, accounted in the teacher's load and the metrics."""
        start = time.perf_counter()
        through = teacher.load.start(len(texts))
        try:
            out = await client.score(texts, k, truncate=True, float_dtype=self.float_dtype)
        except ServiceError as exc:
            teacher.load.finish(len(texts))
            self._count(teacher.name, (exc.remote_status or type(exc).__name__).lower())
            raise
        except BaseException:  # cancelled: the caller is gone
            teacher.load.finish(len(texts))
            raise
        latency = time.perf_counter() - start
        teacher.load.finish(len(texts), through, latency)
        if self.metrics is not None:
            self.metrics.teacher_latency.labels(teacher.name).observe(latency)
        self._count(teacher.name, "ok")
        return out

    def _count(self, name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.teacher_calls.labels(name, outcome).inc()

    async def close(self) -> None:
        for teacher in self.teachers.values():
            for client in teacher.clients:
                await client.close()
