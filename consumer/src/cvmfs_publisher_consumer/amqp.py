"""RabbitMQ over AMQP with pika's BlockingConnection, used from one thread only (the daemon's I/O thread).

Heartbeats stay alive because that thread never runs playbooks: it loops in ``process`` while workers run
ansible-runner and hand their results back through a queue the loop drains. Each consumed queue gets its own
channel (a broker error on one repository's queue closes only that channel) in publisher-confirm mode, so
a retry copy or a dead-lettered copy is confirmed by the broker before the original is acked.
"""
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pika
import pika.exceptions

ATTEMPTS_HEADER = "x-cvmfs-publisher-attempts"
NOT_BEFORE_HEADER = "x-cvmfs-publisher-not-before-ms"  # epoch milliseconds (AMQP tables have no float)
REASON_HEADER = "x-cvmfs-publisher-reason"
ORIGIN_HEADER = "x-cvmfs-publisher-queue"
DEAD_LETTERED_AT_HEADER = "x-cvmfs-publisher-dead-lettered-at"
CAUSE_HEADER = "x-cvmfs-publisher-cause"
TRANSIENT = "transient"   # its runs kept failing: a full sync of the repository supersedes it once one succeeds
MALFORMED = "malformed"   # can never succeed: stays for an operator
SWEEP_LIMIT = 10000       # dead letters looked at per sweep; the rest wait for the next one
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}
STREAM_ARGUMENTS = {"x-queue-type": "stream"}
# Every consumer this daemon starts is tagged "cvmfs-publisher@<host id>#<n>", so the broker's consumer list
# (management API) says which publisher host consumes, and is active on, which queue (see spread.py).
CONSUMER_TAG_PREFIX = "cvmfs-publisher@"
PERSISTENT = pika.DeliveryMode.Persistent

log = logging.getLogger("cvmfs_publisher.amqp")

# What a lost or refused connection looks like; the daemon reconnects after any of these.
CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed,
                     pika.exceptions.StreamLostError, ConnectionError, OSError)


def connection_parameters(settings: Dict, password: str) -> pika.ConnectionParameters:
    """``settings`` is the ``amqp`` section of the configuration."""
    ssl_options = None
    if settings["tls"]:
        context = ssl.create_default_context(cafile=settings["ca_cert"])  # verifies the chain and host name
        if settings["client_cert"]:
            context.load_cert_chain(settings["client_cert"], settings["client_key"])
        ssl_options = pika.SSLOptions(context, server_hostname=settings["server_hostname"] or settings["host"])
    return pika.ConnectionParameters(
        host=settings["host"], port=settings["port"], virtual_host=settings["vhost"],
        credentials=pika.PlainCredentials(settings["user"], password, erase_on_connect=False),
        heartbeat=settings["heartbeat"], blocked_connection_timeout=max(60, 2 * settings["heartbeat"]),
        socket_timeout=settings["connection_timeout"], stack_timeout=settings["connection_timeout"] * 3,
        connection_attempts=1, ssl_options=ssl_options, client_properties={"connection_name": "cvmfs-publisher"})


def connection_candidates(settings: Dict, password: str) -> List[pika.ConnectionParameters]:
    """``amqp.host:amqp.port`` first, then each ``amqp.fallback_hosts`` entry (``host:port``, other nodes of a
    RabbitMQ cluster): pika tries them in turn on every (re)connect."""
    candidates = [connection_parameters(settings, password)]
    for entry in settings.get("fallback_hosts") or []:
        host, _colon, port = entry.rpartition(":")
        candidates.append(connection_parameters(dict(settings, host=host, port=int(port)), password))
    return candidates


def consumer_tag(host_id: str, serial: int) -> str:
    return "%s%s#%d" % (CONSUMER_TAG_PREFIX, host_id, serial)


def host_of_tag(tag: str) -> Optional[str]:
    """The publisher host id in a consumer tag made by ``consumer_tag``; None for anyone else's consumer."""
    if not isinstance(tag, str) or not tag.startswith(CONSUMER_TAG_PREFIX) or "#" not in tag:
        return None
    return tag[len(CONSUMER_TAG_PREFIX):].rpartition("#")[0] or None


def connection_error_text(exc) -> str:
    """What to log for a failed or lost connection; a refused broker certificate says what to fix."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        text += ("; the broker's TLS certificate was refused: set amqp.ca_cert to the CA bundle that signs it and "
                 "amqp.host (or amqp.server_hostname) to a name it covers")
    return text


def header(properties, name, default=None):
    return (properties.headers or {}).get(name, default) if properties else default


def attempts_of(properties) -> int:
    try:
        return max(0, int(header(properties, ATTEMPTS_HEADER, 0)))
    except (TypeError, ValueError):
        return 0


def not_before_of(properties) -> float:
    try:
        return int(header(properties, NOT_BEFORE_HEADER, 0)) / 1000.0
    except (TypeError, ValueError):
        return 0.0


@dataclass
class Delivery:
    """A message received and not yet settled; only the connection it came on can ack it."""
    queue: str
    tag: int
    body: bytes
    properties: pika.BasicProperties
    channel: object
    generation: int


class Broker:
    """One connection and its consumers. Not thread-safe: call it from the I/O thread only."""

    def __init__(self, parameters, dead_letter_queue: str, host_id: str = ""):
        self._parameters = parameters   # one pika.ConnectionParameters, or a list tried in turn
        self.dead_letter_queue = dead_letter_queue
        self.host_id = host_id or "unnamed"
        self._connection: Optional[pika.BlockingConnection] = None
        self._consumers: Dict[str, object] = {}   # queue -> channel
        self._serial = 0
        self.generation = 0

    # -- connection ---------------------------------------------------------------------------------------

    def connect(self, declare_dead_letter: bool = True):
        self.close()
        self._connection = pika.BlockingConnection(self._parameters)
        self.generation += 1
        self._consumers = {}
        if declare_dead_letter:
            problem = self.ensure_queue(self.dead_letter_queue)
            if problem:
                log.warning("dead-letter queue %s exists with other arguments: %s", self.dead_letter_queue, problem)

    @property
    def is_open(self) -> bool:
        return bool(self._connection and self._connection.is_open)

    def process(self, time_limit: float):
        """Service the socket (heartbeats, deliveries) for up to ``time_limit`` seconds."""
        self._connection.process_data_events(time_limit=time_limit)

    def wake(self, callback: Callable[[], None]):
        """From any thread: make ``process`` return soon. Quietly nothing if the connection is gone."""
        try:
            if self._connection and self._connection.is_open:
                self._connection.add_callback_threadsafe(callback)
        except Exception:  # noqa: BLE001 -- a closing connection; the loop's own timeout covers it
            pass

    def close(self):
        connection, self._connection = self._connection, None
        self._consumers = {}
        if connection and connection.is_open:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 -- closing a broken connection may fail; nothing to keep
                pass

    # -- consuming ----------------------------------------------------------------------------------------

    def queue_exists(self, queue: str) -> Optional[int]:
        """The queue's ready-message count, or None if it does not exist (probed on a throwaway channel)."""
        channel = self._connection.channel()
        try:
            result = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        channel.close()
        return result.method.message_count

    def single_active_consumer_problem(self, queue: str) -> Optional[str]:
        """Whether ``queue`` was declared without x-single-active-consumer (None when it was, or unknown).

        AMQP cannot read a queue's arguments; re-declaring with the expected ones makes the broker compare.
        """
        channel = self._connection.channel()
        arguments = dict(QUEUE_ARGUMENTS, **{"x-single-active-consumer": True})
        try:
            channel.queue_declare(queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406 and "x-single-active-consumer" in str(exc.reply_text):
                return str(exc.reply_text)
            return None
        channel.close()
        return None

    def consume(self, queue: str, prefetch: int, on_message: Callable[[Delivery], None],
                arguments: Optional[Dict] = None) -> bool:
        """Start consuming ``queue`` on its own channel; False if the queue does not exist. The consumer tag
        names this host (``consumer_tag``); ``arguments`` go with basic.consume (e.g. a stream offset)."""
        if self.consuming(queue):
            return True
        if self.queue_exists(queue) is None:
            return False
        channel = self._connection.channel()
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=prefetch)
        generation = self.generation

        def deliver(ch, method, properties, body):
            on_message(Delivery(queue, method.delivery_tag, body, properties, ch, generation))

        self._serial += 1
        channel.basic_consume(queue, deliver, auto_ack=False, arguments=arguments,
                              consumer_tag=consumer_tag(self.host_id, self._serial))
        self._consumers[queue] = channel
        return True

    def release(self, queue: str):
        """Leave ``queue``: close its channel, so the broker hands its single-active-consumer position to the
        next waiting consumer and takes back whatever this one had not settled."""
        channel = self._consumers.pop(queue, None)
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except pika.exceptions.AMQPChannelError:
                pass

    def consuming(self, queue: str) -> bool:
        """True while the queue's channel is open and its consumer was not cancelled (e.g. queue deleted)."""
        channel = self._consumers.get(queue)
        return bool(channel and channel.is_open and channel.consumer_tags)

    def ensure_queue(self, queue: str) -> Optional[str]:
        """Declare a durable quorum queue this daemon owns (the provisioning queue); a problem text if it
        exists with other arguments (it is still usable)."""
        return self._declare(queue, QUEUE_ARGUMENTS)

    def ensure_exchange_binding(self, exchange: str, queue: str) -> Optional[str]:
        """Declare ``exchange`` (durable, direct) and bind ``queue`` to it with the queue's name as routing key:
        the one place a publisher with no other right can put messages for ``queue`` (the broker cannot limit
        which queues a publisher reaches through the default exchange). A problem text if the broker refuses."""
        channel = self._connection.channel()
        try:
            channel.exchange_declare(exchange, exchange_type="direct", durable=True)
            channel.queue_bind(queue, exchange, routing_key=queue)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code in (403, 406):
                return str(exc.reply_text)
            raise
        channel.close()
        return None

    def ensure_stream(self, queue: str) -> Optional[str]:
        """Declare a durable stream (an append-only log every consumer can read from the start); a problem
        text if ``queue`` exists as something else."""
        return self._declare(queue, STREAM_ARGUMENTS)

    def _declare(self, queue: str, arguments: Dict) -> Optional[str]:
        """Declare ``queue`` durable with ``arguments``; the broker's refusal text (406) if it exists otherwise."""
        channel = self._connection.channel()
        try:
            channel.queue_declare(queue, durable=True, arguments=dict(arguments))
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:
                return str(exc.reply_text)
            raise
        channel.close()
        return None

    def stop_consuming(self):
        """Cancel every consumer (no new deliveries); unsettled messages can still be acked or nacked."""
        for channel in list(self._consumers.values()):
            try:
                if channel.is_open:
                    for tag in list(channel.consumer_tags):
                        channel.basic_cancel(tag)
            except CONNECTION_ERRORS + (pika.exceptions.AMQPChannelError,):
                pass

    # -- settling -----------------------------------------------------------------------------------------

    def _usable(self, delivery: Delivery) -> bool:
        return delivery.generation == self.generation and delivery.channel.is_open and self.is_open

    def ack(self, delivery: Delivery) -> bool:
        """False when it cannot be acked any more (its channel or connection is gone): the broker redelivers."""
        if not self._usable(delivery):
            return False
        try:
            delivery.channel.basic_ack(delivery.tag)
        except pika.exceptions.AMQPChannelError:
            return False
        return True

    def requeue(self, delivery: Delivery) -> bool:
        if not self._usable(delivery):
            return False
        try:
            delivery.channel.basic_nack(delivery.tag, requeue=True)
        except pika.exceptions.AMQPChannelError:
            return False
        return True

    def _publish_copy(self, delivery: Delivery, routing_key: str, headers: Dict) -> bool:
        """Publish a copy of the message with extra headers and wait for the broker's confirm."""
        if not self._usable(delivery):
            return False
        source = delivery.properties or pika.BasicProperties()
        merged = dict(source.headers or {})
        merged.update(headers)
        properties = pika.BasicProperties(content_type=source.content_type, content_encoding=source.content_encoding,
                                          message_id=source.message_id, timestamp=source.timestamp,
                                          delivery_mode=PERSISTENT, headers=merged)
        try:
            delivery.channel.basic_publish("", routing_key, delivery.body, properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.error("broker refused the copy for queue %s: %s", routing_key, exc)
            return False
        except pika.exceptions.AMQPChannelError:
            return False
        return True

    def forward(self, delivery: Delivery, queue: str) -> bool:
        """Append a copy of the message to ``queue`` (confirmed by the broker), then ack the original; put the
        original back if the copy was refused."""
        if self._publish_copy(delivery, queue, {ORIGIN_HEADER: delivery.queue}):
            return self.ack(delivery)
        return self.requeue(delivery)

    def retry_later(self, delivery: Delivery, attempts: int, not_before: float) -> bool:
        """Put a copy carrying the attempt count back on the queue, then ack the original."""
        headers = {ATTEMPTS_HEADER: attempts, NOT_BEFORE_HEADER: int(not_before * 1000)}
        if self._publish_copy(delivery, delivery.queue, headers):
            return self.ack(delivery)
        return self.requeue(delivery)

    def dead_letter(self, delivery: Delivery, reason: str, attempts: int, cause: str) -> bool:
        headers = {REASON_HEADER: reason[:1000], ATTEMPTS_HEADER: attempts, ORIGIN_HEADER: delivery.queue,
                   DEAD_LETTERED_AT_HEADER: int(time.time()), CAUSE_HEADER: cause}
        if self._publish_copy(delivery, self.dead_letter_queue, headers):
            return self.ack(delivery)
        return self.requeue(delivery)

    def sweep_dead_letters(self, remove_from=()) -> Dict[str, int]:
        """Transient dead letters per origin queue; those from a queue in ``remove_from`` are removed (a full sync
        of their repository succeeded since). Every other message goes back to the dead-letter queue."""
        channel = self._connection.channel()
        found: Dict[str, int] = {}
        kept = None
        try:
            for _looked in range(SWEEP_LIMIT):
                method, properties, _body = channel.basic_get(self.dead_letter_queue, auto_ack=False)
                if method is None:
                    break
                origin = header(properties, ORIGIN_HEADER)
                if header(properties, CAUSE_HEADER) == TRANSIENT and isinstance(origin, str):
                    found[origin] = found.get(origin, 0) + 1
                    if origin in remove_from:
                        channel.basic_ack(method.delivery_tag)
                        continue
                kept = method.delivery_tag
            if kept is not None:
                channel.basic_nack(kept, multiple=True, requeue=True)
        finally:
            if channel.is_open:
                channel.close()  # anything still unsettled goes back too
        return found
