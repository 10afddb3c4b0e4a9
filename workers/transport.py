"""kombu's Redis transport with two races around a dropped connection closed.

When Redis drops the broker connection (a restart, a failover), kombu closes the channel and
later reaches for it again: to put the worker's unacknowledged messages back, and to
acknowledge tasks that finished meanwhile. Both build a client from a connection that is
already gone, raise ``AttributeError``, and Celery ends the worker ("Unrecoverable error"),
seen on every Redis restart under load. Here a closed channel raises a connection error,
which kombu and Celery already handle (log, reconnect, go on), and the restore at close is
off: docpipe does not need it (the messages stay in Redis' unacked set, the reconciler
re-drives the jobs of a worker whose heartbeat stopped, the visibility timeout restores any
other, and a stale copy does nothing).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class QoS(kombu_redis.QoS):
    restore_at_shutdown = False


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("this broker channel's connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """Also: a Redis that turned replica or ran out of memory answers the broker's commands with
    an error reply, not a dropped connection (``READONLY``, ``OOM``, and ``UNBLOCKED`` to a
    waiting ``BRPOP`` when a master becomes a replica). kombu counts those as fatal and Celery
    ends the worker; they are outages, to be waited out by reconnecting like any other."""

    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, redis.exceptions.ResponseError)
