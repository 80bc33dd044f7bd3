"""The hand-over of events from the engine's thread to the event loop (``app.Outbox``): every event arrives, in
order, and a burst of events costs the loop one delivery."""

from __future__ import annotations

import asyncio
import threading

from retentive.serving.app import Outbox


def test_a_burst_put_while_the_loop_is_busy_arrives_in_one_delivery_and_in_order() -> None:
    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        outbox, queues = Outbox(loop), [asyncio.Queue(), asyncio.Queue()]
        deliveries = 0
        deliver = outbox._deliver

        def counted() -> None:
            nonlocal deliveries
            deliveries += 1
            deliver()

        outbox._deliver = counted
        engine = threading.Thread(target=lambda: [outbox.put(queues[i % 2], i) for i in range(100)])
        engine.start()
        engine.join()  # the loop is blocked here: every put happens before the first delivery can run
        got = [[await q.get() for _ in range(50)] for q in queues]
        return got, deliveries

    got, deliveries = asyncio.run(main())
    assert got == [list(range(0, 100, 2)), list(range(1, 100, 2))]
    assert deliveries == 1


def test_nothing_is_lost_while_the_loop_delivers_as_the_thread_puts() -> None:
    """The loop and the thread race: a put may come between a delivery's start and its end, or just after it."""
    count = 20_000

    async def main() -> list[int]:
        outbox, queue = Outbox(asyncio.get_running_loop()), asyncio.Queue()
        engine = threading.Thread(target=lambda: [outbox.put(queue, i) for i in range(count)])
        engine.start()
        got = [await asyncio.wait_for(queue.get(), timeout=10) for _ in range(count)]
        engine.join()
        assert queue.empty() and not outbox.pending
        return got

    assert asyncio.run(main()) == list(range(count))


def test_a_closed_loop_takes_nothing() -> None:
    """A put after the loop closed (the server shut down under a running step) neither raises nor schedules."""
    loop = asyncio.new_event_loop()
    outbox = Outbox(loop)
    loop.close()
    outbox.put(asyncio.Queue(), "late")
    assert not outbox.scheduled
