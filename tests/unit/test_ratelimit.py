import asyncio
import time

from worker.sink.ratelimit import TokenBucket


def test_bucket_holds_the_rate_after_its_burst():
    async def take_all() -> float:
        bucket = TokenBucket(rate=200)  # burst: one second's worth
        started = time.monotonic()
        for _ in range(6):
            await bucket.take(100)  # 600 events: 200 from the burst, 400 at 200/s
        return time.monotonic() - started

    elapsed = asyncio.run(take_all())
    assert 1.9 <= elapsed < 4.0
