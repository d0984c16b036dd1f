"""faust's Kafka transport (aiokafka) with the consumer's fetch wait from the settings.

faust builds its consumer with ``fetch_max_wait_ms=1500`` and no way to change it. On the
embedded broker (Tansu) a record then reaches the consumer up to that long after it was
produced, even when it was there at once (measured at 20 records/s: delivery p50 391 ms at
1,500 ms, 20 ms at 100 ms), which was most of the worker's feature freshness. This transport
gives the consumer ``worker_fetch_wait_ms`` instead; everything else is faust's.
"""

from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as driver


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it makes its fetcher (after this, before any fetch).
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = _Consumer
    fetch_max_wait_ms = 1500  # faust's


def use_fetch_wait(app: faust.App, fetch_max_wait_ms: int) -> None:
    """Give ``app``'s consumer this fetch wait (call before the app starts)."""
    transport = Transport(app.conf.broker_consumer, app)
    transport.fetch_max_wait_ms = fetch_max_wait_ms
    app.transport = transport
