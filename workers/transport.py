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

One addition: the note of which worker holds a message (``docpipe:held:<holder>``, what the
reconciler reads when a heartbeat stops) is written in the same round trip that records the
message as unacknowledged. Written apart, from Celery's ``task_received`` signal, it was one
more blocking round trip of the consumer's event loop per message: with Redis 20 ms away the
loop spent a sixth of its time there, and the worker's threads sat idle waiting for messages.
The same round trip raises the mark of how far the message's lane has been read
(``pipeline.jobs.RECEIVED``): the reconciler tells a lost message from one waiting its turn by it.

And acknowledgements leave the loop: kombu deletes each finished message's unacked record in a
blocking round trip from the event loop (a fifth of its time at 20 ms). Here they are batched
by a thread, a pipeline every few milliseconds. A worker killed before its batch went out
leaves those messages to come back after the visibility timeout: a redelivered copy of a
finished step finds its job moved on and does nothing (``pipeline.jobs`` claims are fenced).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from pipeline.jobs import RECEIVED, held_key
from pipeline.liveness import holder_id

log = logging.getLogger(__name__)


def held_note(message: Any) -> str | None:
    """``"<job id> <message id>"`` for a docpipe step message, None for anything else."""
    try:
        args = message.decode()[0]
        return f"{args[0]['job_id']} {message.headers['id']}"
    except Exception:  # noqa: BLE001 - not a docpipe step (or not decodable): nothing to note
        return None


class AckBatcher:
    """Deletes acknowledged messages' unacked records from a daemon thread, many per round trip."""

    def __init__(self, qos: QoS, linger: float = 0.005) -> None:
        self._qos = qos
        self._linger = linger
        self._tags: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="docpipe-acks", daemon=True)
        self._thread.start()

    def put(self, delivery_tag: str) -> None:
        self._tags.put(delivery_tag)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop."""
        self._tags.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        closing = False
        while not closing:
            tags = [self._tags.get()]
            time.sleep(self._linger)  # let the acks of the same moment join this round trip
            while True:
                try:
                    tags.append(self._tags.get_nowait())
                except queue.Empty:
                    break
            closing = None in tags
            tags = [t for t in tags if t is not None]
            if tags:
                self._delete(tags)

    def _delete(self, tags: list[str]) -> None:
        try:
            with self._qos.channel.conn_or_acquire() as client:
                client.pipeline().zrem(self._qos.unacked_index_key, *tags).hdel(self._qos.unacked_key, *tags).execute()
        except Exception as exc:  # noqa: BLE001 - they come back after the visibility timeout, and do nothing
            log.warning("%d acknowledgements not written (%s); those messages come back after the visibility timeout", len(tags), type(exc).__name__)


class QoS(kombu_redis.QoS):
    restore_at_shutdown = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: AckBatcher | None = None
        self._acks_lock = threading.Lock()

    def ack(self, delivery_tag: str) -> None:
        with self._acks_lock:
            if self._acks is None:
                self._acks = AckBatcher(self)
            acks = self._acks
        acks.put(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def close_acks(self) -> None:
        with self._acks_lock:
            acks, self._acks = self._acks, None
        if acks is not None:
            acks.close()

    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's bookkeeping of an unacknowledged message, and docpipe's note of who holds it, in one pipeline."""
        delivery = message.delivery_info
        note = held_note(message)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
            if note is not None:
                pipe.sadd(held_key(holder_id()), note)
            lane, sent = message.headers.get("docpipe_lane"), message.headers.get("docpipe_sent")
            if lane and sent:  # how far its lane has been read (the reconciler's watermark)
                pipe.zadd(RECEIVED, {lane: float(sent)}, gt=True)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def close(self) -> None:
        qos = getattr(self, "_qos", None)  # only if this channel ever made one
        if qos is not None:
            qos.close_acks()  # the queued acknowledgements go out while the connection still works
        super().close()

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
