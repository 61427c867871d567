"""One generator process of the weights suite, as ``rlaif up`` runs them: a real :class:`Generator` following
the policy topic (``follow_policy``), swapping staged weights in between two (here: empty) generations.

It prints one JSON line per policy version it starts serving, with the time on ``time.monotonic()``, which on
Linux is CLOCK_MONOTONIC, one clock for every process on the machine, so the parent can subtract the moment it
published. Settings come from the parent's ``RLAIF_*`` environment.
"""

from __future__ import annotations

import asyncio
import json
import time

from services._generator import Generator
from services._logging import configure_logging
from services._settings import Settings

MARK = "bench_follower"


def _say(**fields: object) -> None:
    print(json.dumps({MARK: True, **fields}), flush=True)


async def main() -> None:
    configure_logging("bench-follower", level="WARNING")
    gen = Generator(Settings())
    following = asyncio.create_task(gen.follow_policy())
    _say(ready=True)
    while True:  # what the prompt loop does between two generations, every millisecond
        before = gen.version
        gen._swap_if_staged()
        if gen.version != before:
            _say(version=gen.version, at=time.monotonic())
        if following.done():
            following.result()  # a crashed follower fails the bench loudly
        await asyncio.sleep(0.001)


if __name__ == "__main__":
    asyncio.run(main())
