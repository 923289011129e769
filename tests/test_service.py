"""batchingest/service.py: a part that ends on its own is a failure, a signal is not; the
C heap is trimmed once the start-up is done."""

from __future__ import annotations

import asyncio

import pytest

from batchingest import service
from batchingest.service import ServiceFailed, _until_stopped


def test_a_part_that_ends_by_itself_fails_the_service() -> None:
    async def main() -> None:
        stop = asyncio.Event()

        async def quits() -> None:
            return None

        async def waits() -> None:
            await stop.wait()

        runners = [asyncio.create_task(quits(), name="processor"),
                   asyncio.create_task(waits(), name="webhooks")]  # fmt: skip
        await _until_stopped(stop, runners, None)

    with pytest.raises(ServiceFailed, match="processor stopped unexpectedly"):
        asyncio.run(main())


def test_a_stop_request_ends_every_part_quietly() -> None:
    async def main() -> list[bool]:
        stop = asyncio.Event()

        async def waits() -> None:
            await stop.wait()

        runners = [asyncio.create_task(waits(), name=n) for n in ("api", "processor")]
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await _until_stopped(stop, runners, None)
        return [t.done() for t in runners]

    assert asyncio.run(main()) == [True, True]


def test_the_heap_is_trimmed_once_the_processor_has_started() -> None:
    """Without a processor at once; with one, not before its first round is done
    (Processor.started: see test_processor)."""
    trims: list[str] = []

    async def main() -> None:
        started = asyncio.Event()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(service, "_trim_heap", lambda: trims.append("trimmed"))
            await service._trim_once_started(None)
            assert trims == ["trimmed"]
            waiting = asyncio.create_task(service._trim_once_started(started))
            await asyncio.sleep(0.05)
            assert trims == ["trimmed"] and not waiting.done()
            started.set()
            await asyncio.wait_for(waiting, 5)
        assert trims == ["trimmed", "trimmed"]

    asyncio.run(main())
