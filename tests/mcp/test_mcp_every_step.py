"""The MCP server lifecycle routes' operations (add, patch, delete, reconnect) cancelled at every scheduling
step of their requester (tests/cancellation/harness.py ``StepCanceller``; the same proof as
tests/cancellation/test_cancel_every_step.py gives the thread and session routes).

Each case runs once uncancelled to count its N steps, then once cancelled at each k in 1..N. After every run
the test waits until every server has left ``starting`` and every stopped process is reaped, then judges
from three places that must agree: ``mcp.json`` (parsed), the live child processes (from /proc) and the API
(``servers()``): either the whole change happened (file, process, status) or none of it. Then the same
request is made again and must work: an add made with an Idempotency-Key claim replays the stored answer
when the change happened (never 409 "already exists"), and runs when it did not.

Every server start is a real Python process importing the SDK (~0.5-1 s), so a run costs about one start:
the default suite cancels at a sample of steps (the first, the second, the middle and the last two), the
``reliability`` marker at every step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from runtime.errors import RuntimeFailure
from runtime.mcp import config as mcp_config
from tests.cancellation.harness import StepCanceller, claim
from tests.support import open_runtime

from .test_mcp_runtime import LIMIT, children, entry, write_file


# Runs per k: a run that ended before its k (fewer steps than the counting run: none was seen, but a wait
# that finds its event already set could make one) is judged like any other, then k is tried again.
TRIES = 3


@dataclasses.dataclass
class Ctx:
    rt: Any
    data_dir: Path
    marks: Path
    before: set[int]  # child pids of the test process before the runtime started
    run: int = 0


@dataclasses.dataclass
class Case:
    name: str
    # Makes the state the operation needs (uncancelled); returns nothing.
    setup: Callable[[Ctx], Awaitable[None]]
    # The operation (the same request every time within a run and its retry).
    action: Callable[[Ctx], Awaitable[Any]]
    # (file before, file after, pids before, pids after, ctx) -> did the change happen? Asserts it is whole.
    happened: Callable[[dict[str, Any], dict[str, Any], set[int], set[int], Ctx], bool]
    # The retry of the same request after a run: (ctx, happened) -> checks it works.
    retry: Callable[[Ctx, bool], Awaitable[None]]


def _file(ctx: Ctx) -> dict[str, Any]:
    """The servers of mcp.json as their file entries (secrets included: compared, never shown)."""
    return {name: cfg.to_file() for name, cfg in mcp_config.load(ctx.data_dir).items()}


async def _quiet(ctx: Ctx) -> set[int]:
    """Wait until every server left ``starting`` and the live children are exactly one per enabled server
    (a stopped one is reaped by its own task, which a cancelled request no longer waits for); polled for
    the processes (another process's state), bounded."""
    with trio.fail_after(LIMIT):
        for view in ctx.rt.mcp.servers():
            state = ctx.rt.mcp.state(view["name"])
            if state is not None:
                await state.settled.wait()
        want = sum(1 for v in ctx.rt.mcp.servers() if v["enabled"])
        while len(now := children() - ctx.before) != want:
            await trio.sleep(0.02)
    return now


def _agree(ctx: Ctx, file: dict[str, Any]) -> None:
    """File and API agree: the same servers in the same order, the same (redacted) config, each enabled one
    ready, and the tools offered are those of the file's servers."""
    views = ctx.rt.mcp.servers()
    assert [v["name"] for v in views] == list(file), (views, list(file))
    for view in views:
        cfg = mcp_config.parse(view["name"], file[view["name"]])
        assert view["config"] == cfg.redacted()
        assert view["status"] == ("ready" if cfg.enabled else "disabled"), view
        assert ctx.rt.mcp.state(view["name"]).config == cfg
    assert {s.name.split("__")[0] for s in ctx.rt.manager.tools.spec() if "__" in s.name} == {
        n for n, e in file.items() if e["enabled"]}


# ---- the cases -----------------------------------------------------------------------------------


KEY = "add-new"


async def _add_setup(ctx: Ctx) -> None:
    if "new" in _file(ctx):
        await ctx.rt.mcp.delete("new")
    await ctx.rt.store.write([("DELETE FROM idempotency", ())])  # each run's key is fresh


def _add(ctx: Ctx) -> Awaitable[Any]:
    return ctx.rt.mcp.add("new", entry(ctx.marks), claim=claim(KEY))


def _add_happened(before, after, pids_before, pids_after, ctx) -> bool:
    if "new" not in after:
        assert after == before and pids_after == pids_before
        return False
    assert after == {**before, "new": mcp_config.parse("new", entry(ctx.marks)).to_file()}
    assert pids_before < pids_after and len(pids_after - pids_before) == 1
    return True


async def _add_retry(ctx: Ctx, happened: bool) -> None:
    """The keyed retry: the stored answer when the change happened (the web layer replays it before the
    route runs), else the add runs and succeeds."""
    c = claim(KEY)
    stored = await ctx.rt.idempotency.lookup(KEY, c.fingerprint)
    assert (stored is not None) == happened, f"happened={happened} but stored answer {stored}"
    if stored is not None:
        view = json.loads(stored.body)
        assert (view["name"], view["config"]) == ("new", mcp_config.parse("new", entry(ctx.marks)).redacted())
        return
    view = await ctx.rt.mcp.add("new", entry(ctx.marks), claim=c)
    assert view["status"] == "ready"


def _patch_value(ctx: Ctx) -> str:
    return ("auto", "writes")[ctx.run % 2]  # differs from the previous run's, so each run is a change


async def _no_setup(ctx: Ctx) -> None:
    pass


def _patch(ctx: Ctx) -> Awaitable[Any]:
    return ctx.rt.mcp.update("box", {"approval": _patch_value(ctx)})


def _patch_happened(before, after, pids_before, pids_after, ctx) -> bool:
    if after == before:
        assert pids_after == pids_before
        return False
    assert after == {"box": {**before["box"], "approval": _patch_value(ctx)}}
    assert len(pids_after) == 1 and pids_after != pids_before  # restarted with the new config
    return True


async def _patch_retry(ctx: Ctx, happened: bool) -> None:
    view = await _patch(ctx)
    assert (view["status"], view["config"]["approval"]) == ("ready", _patch_value(ctx))


async def _delete_setup(ctx: Ctx) -> None:
    if "box" not in _file(ctx):
        await ctx.rt.mcp.add("box", entry(ctx.marks))


def _delete(ctx: Ctx) -> Awaitable[Any]:
    return ctx.rt.mcp.delete("box")


def _delete_happened(before, after, pids_before, pids_after, ctx) -> bool:
    if after == before:
        assert pids_after == pids_before
        return False
    assert after == {} and pids_after == set()
    return True


async def _delete_retry(ctx: Ctx, happened: bool) -> None:
    if happened:  # gone: the same request is a 404 (NotFound), the state unchanged
        with pytest.raises(RuntimeFailure, match="not found"):
            await _delete(ctx)
    else:
        await _delete(ctx)
        assert ctx.rt.mcp.servers() == [] and _file(ctx) == {}


def _reconnect(ctx: Ctx) -> Awaitable[Any]:
    return ctx.rt.mcp.reconnect("box")


def _reconnect_happened(before, after, pids_before, pids_after, ctx) -> bool:
    assert after == before and len(pids_after) == 1
    return pids_after != pids_before


async def _reconnect_retry(ctx: Ctx, happened: bool) -> None:
    old = children() - ctx.before
    view = await _reconnect(ctx)
    assert view["status"] == "ready"
    assert await _quiet(ctx) != old


CASES = [
    Case("add (keyed)", _add_setup, _add, _add_happened, _add_retry),
    Case("patch", _no_setup, _patch, _patch_happened, _patch_retry),
    Case("delete", _delete_setup, _delete, _delete_happened, _delete_retry),
    Case("reconnect", _no_setup, _reconnect, _reconnect_happened, _reconnect_retry),
]


# ---- the runner ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    steps: int = 0
    fired_at: int | None = None
    cancelled: bool = False
    error: RuntimeFailure | None = None


async def _run(ctx: Ctx, canceller: StepCanceller, action: Callable[[], Awaitable[Any]], k: int | None) -> Run:
    """``action`` in a requester task of its own, cancelled at its k-th scheduling step (None: never)."""
    run = Run()
    scope = trio.CancelScope()

    async def requester() -> None:
        me = trio.lowlevel.current_task()

        def cancel(reason: str) -> trio.CancelScope:
            scope.cancel(reason=reason)
            return scope

        canceller.arm(lambda task: task is me, cancel, k)
        try:
            with scope:
                await trio.lowlevel.checkpoint()  # step 1: a cancel before the operation's first checkpoint
                try:
                    await action()
                except RuntimeFailure as exc:
                    run.error = exc
            run.cancelled = scope.cancelled_caught
        finally:
            run.steps, run.fired_at = canceller.steps, canceller.fired_at
            canceller.disarm()

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requester)
    return run


async def _run_and_judge(ctx: Ctx, case: Case, canceller: StepCanceller, k: int | None) -> Run:
    ctx.run += 1
    await case.setup(ctx)
    pids_before = await _quiet(ctx)
    before = _file(ctx)
    _agree(ctx, before)
    run = await _run(ctx, canceller, lambda: case.action(ctx), k)
    where = f"{case.name} cancelled at step {k}"
    assert run.fired_at in (k, None), f"{where}: fired at {run.fired_at}"
    assert run.error is None, f"{where}: {run.error!r}"
    pids_after = await _quiet(ctx)
    after = _file(ctx)
    try:
        _agree(ctx, after)
        happened = case.happened(before, after, pids_before, pids_after, ctx)
        if not run.cancelled:
            assert happened, "an uncancelled run made no change"
        assert [p.name for p in ctx.data_dir.iterdir() if p.name.startswith(".")] == [], "temp files left"
        await case.retry(ctx, happened)
        now = _file(ctx)
        await _quiet(ctx)
        _agree(ctx, now)
    except AssertionError as exc:
        raise AssertionError(f"{where}: file, processes and API disagree, or the retry failed") from exc
    return run


def _steps(n: int, full: bool) -> list[int]:
    """Every k in 1..n, or the sample the default suite runs."""
    return list(range(1, n + 1)) if full else sorted({k for k in (1, 2, (n + 1) // 2, n - 1, n) if 1 <= k <= n})


async def _every_step(tmp_path: Path, case: Case, full: bool) -> None:
    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    data_dir.mkdir()
    marks.mkdir()
    write_file(data_dir, {"box": entry(marks)})
    before = children()
    canceller = StepCanceller()
    async with open_runtime(data_dir) as rt:
        ctx = Ctx(rt, data_dir, marks, before)
        trio.lowlevel.add_instrument(canceller)
        try:
            n = (await _run_and_judge(ctx, case, canceller, None)).steps
            assert n >= 2, f"{case.name}: only {n} steps"
            ks = _steps(n, full)
            print(f"\n{case.name}: N={n} requester steps; cancelled at {ks}", end="")
            for k in ks:
                for _ in range(TRIES):
                    run = await _run_and_judge(ctx, case, canceller, k)
                    if run.fired_at == k:
                        break
                else:
                    raise AssertionError(f"{case.name}: {TRIES} runs ended before step {k}; its cancel never landed")
        finally:
            trio.lowlevel.remove_instrument(canceller)
    assert children() - before == set(), "a server process outlived the runtime"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_lifecycle_change_cancelled_at_sampled_steps_is_all_or_nothing(tmp_path, case: Case):
    await _every_step(tmp_path, case, full=False)


@pytest.mark.reliability
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_reliability_a_lifecycle_change_cancelled_at_every_step_is_all_or_nothing(tmp_path, case: Case):
    await _every_step(tmp_path, case, full=True)
