"""Webhook delivery (placeholder until delivery lands: records nothing, sends nothing)."""

from __future__ import annotations

import asyncio

from batchingest.config import Config
from batchingest.store import Store


class Webhooks:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store

    def attach(self) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
