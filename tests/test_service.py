"""batchingest/service.py: a part that ends on its own is a failure, a signal is not."""

from __future__ import annotations

import asyncio

import pytest

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
