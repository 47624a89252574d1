"""Lifetimes: no pool deadlock, streaming, background tasks, closed-session misuse, scripts, logs.

Each scenario that the FastAPI tutorial's ``get_db`` pattern gets wrong is run on a tutorial-style
app too, asserting the bad outcome, so the test shows what the library fixes.
"""

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Annotated, Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_sessionmaker import AsyncFastAPISessionMaker
from tests.conftest import Maker, MakerFactory, checked_out, pool_of
from tests.models import User, reset_tables, stored_emails

Serve = Callable[..., httpx.Client]
SMALL_POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 30}


class UserOut(BaseModel):
    """A response model: FastAPI validates it in a worker thread for sync endpoints."""

    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    email: str


def blast(base_url: str, requests: Sequence[tuple[str, str]], *, timeout: float = 30.0) -> list[int]:
    """Send all ``requests`` at once from one event loop; each status (-1 for a client timeout)."""

    async def one(client: httpx.AsyncClient, method: str, path: str) -> int:
        try:
            return (await client.request(method, path)).status_code
        except httpx.TimeoutException:
            return -1

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
            jobs = asyncio.gather(*(one(client, method, path) for method, path in requests))
            return list(await asyncio.wait_for(jobs, timeout + 5))

    return asyncio.run(main())


def users_app(maker: Maker) -> FastAPI:
    """Read and create users with a ``response_model``; sync endpoints for the sync twin."""
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    if maker.is_async:

        @app.get("/users/{email}")
        async def read_async(email: str, session: Db) -> UserOut:
            user = (await session.scalars(sa.select(User).where(User.email == email))).one_or_none()
            if user is None:
                raise HTTPException(404)
            return UserOut.model_validate(user)

        @app.post("/users/{email}")
        async def create_async(email: str, session: Db) -> UserOut:
            user = User(email=email)
            session.add(user)
            await session.flush()
            return UserOut.model_validate(user)

    else:

        @app.get("/users/{email}", response_model=UserOut)
        def read_sync(email: str, session: Db) -> User:  # validated by FastAPI in a worker thread
            user = session.scalars(sa.select(User).where(User.email == email)).one_or_none()
            if user is None:
                raise HTTPException(404)
            return user  # type: ignore[no-any-return]

        @app.post("/users/{email}", response_model=UserOut)
        def create_sync(email: str, session: Db) -> User:
            user = User(email=email)
            session.add(user)
            session.flush()
            return user

    return app


def tutorial_app(url: str, **engine_options: Any) -> tuple[FastAPI, sa.Engine]:
    """The FastAPI tutorial: ``SessionLocal`` and a ``get_db`` generator that closes the session."""
    engine = sa.create_engine(url, **engine_options)
    session_local = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        db = session_local()
        try:
            yield db
        finally:
            db.close()

    app = FastAPI()

    @app.get("/users/{email}", response_model=UserOut)
    def read(email: str, db: Session = Depends(get_db)) -> User:
        user = db.scalars(sa.select(User).where(User.email == email)).one_or_none()
        if user is None:
            raise HTTPException(404)
        return user

    return app, engine


def seed(engine: sa.Engine, *emails: str) -> None:
    reset_tables(engine)
    with Session(engine) as session, session.begin():
        session.add_all(User(email=email) for email in emails)


# -- 1. no pool deadlock -----------------------------------------------------------------------


def test_tutorial_pattern_deadlocks_sync_response_model_endpoints(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    """The bad outcome: 100 requests on a pool of 2 end in pool timeouts (1 s here, to be quick).

    The server's worker-thread pool is cut from 40 to 16 so that the threads run out even when a
    loaded machine lets the requests trickle in: the mechanism is the same, only sooner.
    """
    seed(sync_engine, "a@x")
    url = sync_engine.url.render_as_string(hide_password=False)
    app, engine = tutorial_app(url, pool_size=2, max_overflow=0, pool_timeout=1)

    @contextlib.asynccontextmanager
    async def few_threads(app_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 16
        yield
        engine.dispose()  # at server shutdown, once the requests still in worker threads ended

    app.router.lifespan_context = few_threads
    client = serve(app)
    statuses = blast(str(client.base_url), [("GET", "/users/a@x")] * 100, timeout=20)
    assert statuses.count(500) > 0, statuses  # sqlalchemy.exc.TimeoutError: QueuePool limit ...
    assert set(statuses) <= {200, 500, -1}  # -1: the client gave up waiting (a hang)


@pytest.mark.parametrize("kind", ["read", "write"])
def test_no_pool_deadlock_100_requests_on_pool_of_2(
    backend: str, kind: str, make_maker: MakerFactory, sync_engine: sa.Engine, serve: Serve
) -> None:
    seed(sync_engine, "a@x")
    maker = make_maker(engine_options=SMALL_POOL)
    client = serve(users_app(maker))
    if kind == "read":
        requests = [("GET", "/users/a@x")] * 100
    else:
        requests = [("POST", f"/users/{i}@x") for i in range(100)]
    started = time.monotonic()
    statuses = blast(str(client.base_url), requests)
    elapsed = time.monotonic() - started
    assert statuses == [200] * 100
    assert elapsed < 10, f"100 requests took {elapsed:.1f} s"
    if kind == "write":
        assert len(stored_emails(sync_engine)) == 101
    assert checked_out(pool_of(maker)) == 0


def test_no_pool_deadlock_200_mixed_requests_on_pool_of_5(
    backend: str, make_maker: MakerFactory, sync_engine: sa.Engine, serve: Serve
) -> None:
    seed(sync_engine, "a@x")
    maker = make_maker(engine_options={"pool_size": 5, "max_overflow": 0, "pool_timeout": 30})
    client = serve(users_app(maker))
    requests: list[tuple[str, str]] = []
    expected: list[int] = []
    for i in range(50):
        requests += [("GET", "/users/a@x"), ("GET", f"/users/missing{i}@x"), ("GET", "/ping")]
        expected += [200, 404, 200]
        if backend == "sqlite":  # one writer at a time: a read of a stored row instead
            requests.append(("GET", "/users/a@x"))
        else:
            requests.append(("POST", f"/users/{i}@x"))
        expected.append(200)
    started = time.monotonic()
    statuses = blast(str(client.base_url), requests)
    elapsed = time.monotonic() - started
    assert statuses == expected
    assert elapsed < 10, f"200 requests took {elapsed:.1f} s"
    assert len(stored_emails(sync_engine)) == (1 if backend == "sqlite" else 51)


# -- helpers for streams and background tasks ---------------------------------------------------


class Done:
    """Pure ASGI middleware (outermost): sets ``event`` when a request has fully ended."""

    def __init__(self, app: ASGIApp, event: threading.Event) -> None:
        self.app = app
        self.event = event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.event.set()


async def wait_for(gate: threading.Event) -> None:
    """Wait (bounded) for ``gate`` without blocking the event loop."""
    assert await anyio.to_thread.run_sync(gate.wait, 10), "gate not opened in time"


def naive_app(url: str, *, commit_after_yield: bool) -> tuple[FastAPI, sa.Engine, Any]:
    """A tutorial-style app: ``get_db`` under a plain ``Depends`` (optionally committing)."""
    engine = sa.create_engine(url)
    session_local = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        db = session_local()
        try:
            yield db
            if commit_after_yield:
                db.commit()
        except BaseException:
            db.rollback()
            raise
        finally:
            db.close()

    app = FastAPI()
    return app, engine, Depends(get_db)


# -- 2. streaming ------------------------------------------------------------------------------


def test_tutorial_stream_of_loaded_rows_holds_a_connection_while_the_client_reads(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    seed(sync_engine, "a@x", "b@x")
    app, engine, db_dependency = naive_app(sync_engine.url.render_as_string(False), commit_after_yield=True)
    gate = threading.Event()
    done = threading.Event()
    app.add_middleware(Done, event=done)

    @app.get("/export")
    def export(db: Session = db_dependency) -> StreamingResponse:
        emails = list(db.scalars(sa.select(User.email).order_by(User.email)))

        def body() -> Iterator[str]:
            yield emails[0] + "\n"
            assert gate.wait(10)
            yield from (email + "\n" for email in emails[1:])

        return StreamingResponse(body(), media_type="text/plain")

    client = serve(app)
    try:
        with client.stream("GET", "/export") as response:
            chunks = response.iter_text()
            assert next(chunks) == "a@x\n"
            held = engine.pool.checkedout()  # type: ignore[attr-defined]
            gate.set()
            assert "".join(chunks) == "b@x\n"
    finally:
        gate.set()
        assert done.wait(10), "the request did not end"
        engine.dispose()
    assert held == 1  # the bad outcome: a slow reader keeps a connection checked out


def test_stream_of_loaded_rows_holds_no_connection_while_the_client_reads(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    seed(sync_engine, "a@x", "b@x")
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    gate = threading.Event()

    async def body(emails: list[str]) -> AsyncIterator[str]:
        yield emails[0] + "\n"
        await wait_for(gate)
        for email in emails[1:]:
            yield email + "\n"

    if maker.is_async:

        @app.get("/export")
        async def export_async(session: Db) -> StreamingResponse:
            emails = list(await session.scalars(sa.select(User.email).order_by(User.email)))
            return StreamingResponse(body(emails), media_type="text/plain")
    else:

        @app.get("/export")
        def export_sync(session: Db) -> StreamingResponse:
            emails = list(session.scalars(sa.select(User.email).order_by(User.email)))
            return StreamingResponse(body(emails), media_type="text/plain")

    client = serve(app)
    try:
        with client.stream("GET", "/export") as response:
            chunks = response.iter_text()
            assert next(chunks) == "a@x\n"
            held = checked_out(pool_of(maker))
            gate.set()
            assert "".join(chunks) == "b@x\n"
    finally:
        gate.set()
    assert held == 0


@pytest.mark.parametrize("ending", ["complete", "error", "disconnect"])
def test_stream_querying_lazily_gives_the_connection_back(
    ending: str, maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    """Server-sent events that query the request's session per event, ended three ways."""
    seed(sync_engine, "a@x", "b@x", "c@x")
    app = FastAPI()
    maker.init_app(app)
    done = threading.Event()
    app.add_middleware(Done, event=done)
    Db = Annotated[Any, maker.dependency]
    gate = threading.Event()
    query = sa.select(User.email).order_by(User.email).limit(1)

    def event(email: str) -> str:
        return f"data: {email}\n\n"

    if maker.is_async:

        @app.get("/events")
        async def events_async(session: Db) -> StreamingResponse:
            async def stream() -> AsyncIterator[str]:
                for offset in range(3):
                    yield event((await session.scalars(query.offset(offset))).one())
                    if offset == 0:
                        await wait_for(gate)
                        if ending == "error":
                            raise RuntimeError("the stream failed")

            return StreamingResponse(stream(), media_type="text/event-stream")
    else:

        @app.get("/events")
        def events_sync(session: Db) -> StreamingResponse:
            def stream() -> Iterator[str]:
                for offset in range(3):
                    yield event(session.scalars(query.offset(offset)).one())
                    if offset == 0:
                        assert gate.wait(10)
                        if ending == "error":
                            raise RuntimeError("the stream failed")

            return StreamingResponse(stream(), media_type="text/event-stream")

    client = serve(app)
    received = ""
    try:
        with client.stream("GET", "/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            chunks = response.iter_text()
            received = next(chunks)
            # After the response started, each read is a transaction of its own: nothing is held
            # between chunks (100 streams on a pool of 2 cannot starve it).
            assert checked_out(pool_of(maker)) == 0
            if ending == "disconnect":
                response.close()
                gate.set()
            else:
                gate.set()
                with contextlib.suppress(httpx.HTTPError):
                    received += "".join(chunks)
    finally:
        gate.set()
    assert done.wait(10), "the request did not end"
    assert checked_out(pool_of(maker)) == 0
    if ending == "complete":
        assert received == "data: a@x\n\ndata: b@x\n\ndata: c@x\n\n"
    else:
        assert received.startswith("data: a@x\n\n")
        assert "c@x" not in received


def test_long_lived_event_stream_with_a_session_per_event_holds_no_connection_between_events(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    """For long-lived streams, open a short ``context_session()`` per event: nothing is held between."""
    seed(sync_engine, "a@x", "b@x")
    app = FastAPI()
    maker.init_app(app)
    gate = threading.Event()
    query = sa.select(sa.func.count()).select_from(User)

    async def stream() -> AsyncIterator[str]:
        for _ in range(2):
            if isinstance(maker, AsyncFastAPISessionMaker):
                async with maker.context_session() as session:
                    count = (await session.execute(query)).scalar_one()
            else:
                with maker.context_session() as sync_session:
                    count = sync_session.execute(query).scalar_one()
            yield f"data: {count}\n\n"
            await wait_for(gate)

    @app.get("/events")
    async def events() -> StreamingResponse:
        return StreamingResponse(stream(), media_type="text/event-stream")

    client = serve(app)
    try:
        with client.stream("GET", "/events") as response:
            chunks = response.iter_text()
            assert next(chunks) == "data: 2\n\n"
            held = checked_out(pool_of(maker))
            gate.set()
            assert "".join(chunks) == "data: 2\n\n"
    finally:
        gate.set()
    assert held == 0


# -- 3. background tasks -----------------------------------------------------------------------


def test_tutorial_failing_background_task_undoes_the_acknowledged_write(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    """A ``get_db`` that commits after ``yield`` commits after the background tasks, or never."""
    reset_tables(sync_engine)
    app, engine, db_dependency = naive_app(sync_engine.url.render_as_string(False), commit_after_yield=True)
    done = threading.Event()
    app.add_middleware(Done, event=done)

    def failing_task() -> None:
        raise RuntimeError("the background task failed")

    @app.post("/users/{email}")
    def create(email: str, tasks: BackgroundTasks, db: Session = db_dependency) -> dict[str, str]:
        db.add(User(email=email))
        tasks.add_task(failing_task)
        return {"email": email}

    client = serve(app)
    try:
        assert client.post("/users/a@x").status_code == 200
        assert done.wait(10), "the request did not end"
    finally:
        engine.dispose()
    assert stored_emails(sync_engine) == []  # the bad outcome: a 200 over a write that was undone


def test_background_task_uses_its_own_session_and_never_undoes_the_response(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    done = threading.Event()
    app.add_middleware(Done, event=done)
    Db = Annotated[Any, maker.dependency]
    gate = threading.Event()

    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def audit_async(email: str) -> None:
            await wait_for(gate)
            async with async_maker.context_session() as session:
                session.add(User(email=f"audit-{email}"))

        async def failing_async(email: str) -> None:
            async with async_maker.context_session() as session:
                session.add(User(email=f"lost-{email}"))
                await session.flush()
                raise RuntimeError("the background task failed")

        @app.post("/users/{email}")
        async def create_async(email: str, session: Db, tasks: BackgroundTasks) -> dict[str, str]:
            session.add(User(email=email))
            tasks.add_task(audit_async, email)
            tasks.add_task(failing_async, email)
            return {"email": email}
    else:
        sync_maker = maker

        def audit_sync(email: str) -> None:
            assert gate.wait(10)
            with sync_maker.context_session() as session:
                session.add(User(email=f"audit-{email}"))

        def failing_sync(email: str) -> None:
            with sync_maker.context_session() as session:
                session.add(User(email=f"lost-{email}"))
                session.flush()
                raise RuntimeError("the background task failed")

        @app.post("/users/{email}")
        def create_sync(email: str, session: Db, tasks: BackgroundTasks) -> dict[str, str]:
            session.add(User(email=email))
            tasks.add_task(audit_sync, email)
            tasks.add_task(failing_sync, email)
            return {"email": email}

    client = serve(app)
    try:
        assert client.post("/users/a@x").status_code == 200
        # The request's write is stored while its first background task is still waiting:
        # the commit never depends on the tasks.
        assert stored_emails(sync_engine) == ["a@x"]
    finally:
        gate.set()
    assert done.wait(10), "the request did not end"
    # The failing task rolled back its own write only.
    assert stored_emails(sync_engine) == ["a@x", "audit-a@x"]
    assert checked_out(pool_of(maker)) == 0


# -- 4. closed-session misuse ------------------------------------------------------------------

CLOSED = "permanently closed"


def test_tutorial_session_kept_after_its_request_silently_checks_out_a_connection(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    app, engine, db_dependency = naive_app(sync_engine.url.render_as_string(False), commit_after_yield=False)
    done = threading.Event()
    app.add_middleware(Done, event=done)
    kept: list[Session] = []

    @app.get("/keep")
    def keep(db: Session = db_dependency) -> int:
        kept.append(db)
        return int(db.execute(sa.text("SELECT 1")).scalar_one())

    client = serve(app)
    try:
        assert client.get("/keep").json() == 1
        assert done.wait(10)
        assert kept[0].execute(sa.text("SELECT 2")).scalar_one() == 2  # no error...
        leaked = engine.pool.checkedout()  # type: ignore[attr-defined]
    finally:
        for session in kept:
            session.close()
        engine.dispose()
    assert leaked == 1  # ...and a connection is held until someone closes the stray session


def test_request_session_used_after_its_request_raises_a_clear_error(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    app = FastAPI()
    maker.init_app(app)
    done = threading.Event()
    app.add_middleware(Done, event=done)
    Db = Annotated[Any, maker.dependency]
    kept: list[Any] = []
    errors: list[BaseException] = []

    if maker.is_async:

        async def task_async(session: Any) -> None:
            try:
                await session.execute(sa.text("SELECT 1"))
            except sa.exc.InvalidRequestError as exc:
                errors.append(exc)

        @app.get("/keep")
        async def keep_async(session: Db, tasks: BackgroundTasks) -> int:
            kept.append(session)
            tasks.add_task(task_async, session)
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())

        @app.get("/use-kept")
        async def use_kept_async() -> int:
            return int((await kept[0].execute(sa.text("SELECT 1"))).scalar_one())
    else:

        def task_sync(session: Any) -> None:
            try:
                session.execute(sa.text("SELECT 1"))
            except sa.exc.InvalidRequestError as exc:
                errors.append(exc)

        @app.get("/keep")
        def keep_sync(session: Db, tasks: BackgroundTasks) -> int:
            kept.append(session)
            tasks.add_task(task_sync, session)
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

        @app.get("/use-kept")
        def use_kept_sync() -> int:
            return int(kept[0].execute(sa.text("SELECT 1")).scalar_one())

    client = serve(app)
    assert client.get("/keep").json() == 1
    assert done.wait(10)
    # In a background task of the same request:
    assert len(errors) == 1
    assert CLOSED in str(errors[0])
    # From a later request: a clear 500, no connection taken.
    response = client.get("/use-kept")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    # From any other code:
    stray = kept[0].sync_session if maker.is_async else kept[0]
    with pytest.raises(sa.exc.InvalidRequestError, match=CLOSED):
        stray.execute(sa.text("SELECT 1"))
    assert checked_out(pool_of(maker)) == 0


# -- 5. workers, scripts, tests: no app, no lifespan --------------------------------------------


def run_unit_of_work(maker: Maker, *emails: str, fail: bool = False, commit: bool = False) -> None:
    """Add users in ``maker.context_session()`` (sync or in a fresh event loop)."""
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def main() -> None:
            try:
                async with async_maker.context_session() as session:
                    session.add_all(User(email=email) for email in emails)
                    await session.flush()
                    if commit:
                        await session.commit()
                    if fail:
                        raise LookupError("the job failed")
            finally:
                await async_maker.dispose()

        asyncio.run(main())
    else:
        with maker.context_session() as session:
            session.add_all(User(email=email) for email in emails)
            session.flush()
            if commit:
                session.commit()
            if fail:
                raise LookupError("the job failed")


def test_script_sessions_follow_the_policy_without_an_app(
    make_maker: MakerFactory, sync_engine: sa.Engine
) -> None:
    reset_tables(sync_engine)
    maker = make_maker()
    run_unit_of_work(maker, "a@x")
    assert stored_emails(sync_engine) == ["a@x"]
    with pytest.raises(LookupError, match="the job failed"):
        run_unit_of_work(maker, "b@x", fail=True)
    with pytest.raises(sa.exc.IntegrityError):  # the database error, not wrapped
        run_unit_of_work(maker, "a@x")
    assert stored_emails(sync_engine) == ["a@x"]
    manual = make_maker(policy="manual")
    run_unit_of_work(manual, "c@x")
    run_unit_of_work(manual, "d@x", commit=True)
    assert stored_emails(sync_engine) == ["a@x", "d@x"]
    for made in (maker, manual):
        if made._engine is not None:
            assert checked_out(pool_of(made)) == 0


def test_job_runner_workers_each_get_their_own_session(
    backend: str, make_maker: MakerFactory, sync_engine: sa.Engine
) -> None:
    reset_tables(sync_engine)
    maker = make_maker(engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 10})
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def job(i: int) -> None:
            async with async_maker.context_session() as session:
                session.add(User(email=f"{i}@x"))

        async def main() -> None:
            try:
                await asyncio.wait_for(asyncio.gather(*(job(i) for i in range(20))), 20)
            finally:
                await async_maker.dispose()

        asyncio.run(main())
    else:
        sync_maker = maker

        def sync_job(i: int) -> None:
            with sync_maker.context_session() as session:
                session.add(User(email=f"{i}@x"))

        threads = [threading.Thread(target=sync_job, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads)
        assert checked_out(pool_of(maker)) == 0
    assert len(stored_emails(sync_engine)) == 20
