"""``cvmfs-publisher dlq list|show|replay|purge``: the dead-letter queue without the RabbitMQ management UI.

How it reads the queue: every message is fetched with ``basic.get`` and kept unacknowledged on one channel, so the
whole queue is seen once and nothing is lost if the command dies (unacknowledged messages go back on their own).
Then, per message: those the command does not take are returned (``nack`` with requeue, as the UI's "Nack message
requeue true" does; RabbitMQ counts it as a delivery); ``replay`` publishes a copy to the queue it came from
(publisher-confirmed, ``mandatory``) and only then acks the dead-lettered one; ``purge`` acks (deletes) them.

A replayed message starts over: the attempt count and backoff headers are removed, and what the dead-letter queue
knew (reason, origin, attempts, when) is kept in ``x-cvmfs-publisher-history``, one entry per time it was
dead-lettered, oldest first.
"""
import datetime
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pika
import pika.exceptions

from . import amqp
from .config import read_secret
from .messages import MessageError, parse_provision, short_name

HISTORY_HEADER = "x-cvmfs-publisher-history"
REPLAYED_AT_HEADER = "x-cvmfs-publisher-replayed-at"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` -> seconds; ValueError names the value."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError("invalid age %r: expected a number with an optional unit s, m, h, d or w (e.g. 2h)" % text)
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class DeadLetter:
    """One message of the dead-letter queue, as read (not yet settled)."""
    tag: int
    body: bytes
    properties: pika.BasicProperties
    position: int

    @property
    def headers(self) -> Dict:
        return dict(self.properties.headers or {}) if self.properties else {}

    def _text(self, name) -> str:
        value = self.headers.get(name, "")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def origin(self) -> str:
        return self._text(amqp.ORIGIN_HEADER)

    @property
    def reason(self) -> str:
        return self._text(amqp.REASON_HEADER)

    @property
    def cause(self) -> str:
        """``malformed`` (can never succeed) or ``transient`` (its runs failed); the daemon removes transient ones
        itself once a full sync of their repository succeeded."""
        return self._text(amqp.CAUSE_HEADER)

    @property
    def attempts(self) -> int:
        return amqp.attempts_of(self.properties)

    @property
    def dead_lettered_at(self) -> Optional[float]:
        try:
            return float(self.headers[amqp.DEAD_LETTERED_AT_HEADER])
        except (KeyError, TypeError, ValueError):
            return None

    def repository(self, publisher_queue: str) -> str:
        """The repository it concerns: the queue's own for events; the requested one for provisioning messages
        (empty when the message is too malformed to say)."""
        if self.origin != publisher_queue:
            return self.origin
        try:
            return parse_provision(self.body).repository
        except MessageError:
            return ""

    def as_dict(self, publisher_queue: str) -> Dict:
        body = self.body.decode("utf-8", "replace")
        return {"position": self.position, "origin": self.origin, "repository": self.repository(publisher_queue),
                "reason": self.reason, "cause": self.cause, "attempts": self.attempts,
                "dead_lettered_at": self.dead_lettered_at,
                "history": _plain(self.headers.get(HISTORY_HEADER, [])), "body": body}


def _plain(value):
    """AMQP header values (bytes in tables) as JSON-friendly values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class Filters:
    repository: str = ""        # fqrn or short name (the queue)
    reason: str = ""            # case-insensitive substring of the reason
    older_than: float = 0.0     # seconds since it was dead-lettered
    newer_than: float = 0.0
    origin: str = ""            # the queue it came from

    def matches(self, message: DeadLetter, publisher_queue: str, now: float) -> bool:
        if self.repository:
            wanted = {self.repository, short_name(self.repository)}
            repository = message.repository(publisher_queue)
            if not wanted & {repository, short_name(repository) if repository else ""}:
                return False
        if self.origin and message.origin != self.origin:
            return False
        if self.reason and self.reason.lower() not in message.reason.lower():
            return False
        if self.older_than or self.newer_than:
            at = message.dead_lettered_at
            if at is None:
                return False
            if self.older_than and now - at < self.older_than:
                return False
            if self.newer_than and now - at > self.newer_than:
                return False
        return True


def replay_headers(message: DeadLetter, now: float) -> Dict:
    """The headers of the replayed copy: attempts reset, the dead-letter facts moved into the history."""
    headers = message.headers
    entry = {"reason": message.reason, "cause": message.cause, "queue": message.origin, "attempts": message.attempts,
             "dead_lettered_at": int(message.dead_lettered_at or 0), "replayed_at": int(now)}
    history = list(headers.get(HISTORY_HEADER) or [])
    for name in (amqp.ATTEMPTS_HEADER, amqp.NOT_BEFORE_HEADER, amqp.REASON_HEADER, amqp.ORIGIN_HEADER,
                 amqp.DEAD_LETTERED_AT_HEADER, amqp.CAUSE_HEADER, REPLAYED_AT_HEADER):
        headers.pop(name, None)
    headers[HISTORY_HEADER] = history + [entry]
    headers[REPLAYED_AT_HEADER] = int(now)
    return headers


@dataclass
class Outcome:
    matched: int = 0
    done: int = 0
    kept: int = 0
    failed: List[str] = field(default_factory=list)


class DeadLetterQueue:
    """One connection to the broker, one channel, the dead-letter queue read once per operation."""

    def __init__(self, config, clock=time.time):
        self.queue = config["queues.dead_letter"]
        self.publisher_queue = config["queues.publisher"]
        self._parameters = amqp.connection_parameters(config.section("amqp"), read_secret(config["amqp.password_file"]))
        self._clock = clock

    def _read(self, channel) -> List[DeadLetter]:
        """Every message now in the queue, held unacknowledged on ``channel``."""
        messages = []
        while True:
            method, properties, body = channel.basic_get(self.queue, auto_ack=False)
            if method is None:
                return messages
            messages.append(DeadLetter(method.delivery_tag, body, properties, len(messages) + 1))

    def _session(self, settle: Callable[[object, DeadLetter, Outcome], bool], filters: Filters,
                 limit: int = 0) -> Tuple[List[DeadLetter], Outcome]:
        """Read the queue, call ``settle`` on each matching message (True: it took the message, else it is
        returned), return every other message to the queue."""
        connection = pika.BlockingConnection(self._parameters)
        outcome, matched = Outcome(), []
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            now = self._clock()
            for message in self._read(channel):
                if filters.matches(message, self.publisher_queue, now) and (not limit or len(matched) < limit):
                    matched.append(message)
                    outcome.matched += 1
                    if settle(channel, message, outcome):
                        channel.basic_ack(message.tag)
                        outcome.done += 1
                        continue
                channel.basic_nack(message.tag, requeue=True)
                outcome.kept += 1
        finally:
            connection.close()
        return matched, outcome

    def select(self, filters: Filters, limit: int = 0) -> List[DeadLetter]:
        return self._session(lambda *_args: False, filters, limit)[0]

    def replay(self, filters: Filters, limit: int = 0) -> Outcome:
        def republish(channel, message: DeadLetter, outcome: Outcome) -> bool:
            if not message.origin:
                outcome.failed.append("message %d: no %s header, origin unknown"
                                      % (message.position, amqp.ORIGIN_HEADER))
                return False
            source = message.properties
            properties = pika.BasicProperties(content_type=source.content_type,
                                              content_encoding=source.content_encoding,
                                              message_id=source.message_id, timestamp=source.timestamp,
                                              delivery_mode=amqp.PERSISTENT,
                                              headers=replay_headers(message, self._clock()))
            try:
                channel.basic_publish("", message.origin, message.body, properties, mandatory=True)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                outcome.failed.append("message %d: queue %r does not exist (any more)"
                                      % (message.position, message.origin))
                return False
            return True
        return self._session(republish, filters, limit)[1]

    def purge(self, filters: Filters, limit: int = 0) -> Outcome:
        return self._session(lambda *_args: True, filters, limit)[1]


# -- the command ---------------------------------------------------------------------------------------------

def _when(timestamp) -> str:
    if not timestamp:
        return "?"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def add_parser(sub):
    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead-lettered messages")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (("list", "one line per message"), ("show", "messages in full (headers, history, body)"),
                       ("replay", "return messages to their queue, attempts reset, history kept"),
                       ("purge", "delete messages (asks first unless --yes)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--repository", default="", help="fqrn or short name")
        action.add_argument("--queue", default="", help="the queue they came from")
        action.add_argument("--reason", default="", help="text the reason contains (case-insensitive)")
        action.add_argument("--older-than", default="", metavar="AGE", help="dead-lettered at least AGE ago "
                            "(e.g. 30m, 2h, 7d)")
        action.add_argument("--newer-than", default="", metavar="AGE", help="dead-lettered at most AGE ago")
        action.add_argument("--limit", type=int, default=0, help="act on at most this many (0: all)")
        if name in ("list", "show"):
            action.add_argument("--json", action="store_true", help="print JSON")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def run(config, args, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    try:
        filters = Filters(repository=args.repository, reason=args.reason, origin=args.queue,
                          older_than=parse_age(args.older_than) if args.older_than else 0.0,
                          newer_than=parse_age(args.newer_than) if args.newer_than else 0.0)
    except ValueError as exc:
        print("cvmfs-publisher dlq: %s" % exc, file=sys.stderr)
        return 2
    dlq = DeadLetterQueue(config)
    try:
        return _ACTIONS[args.dlq_command](dlq, filters, args, stdin, out)
    except amqp.CONNECTION_ERRORS as exc:
        print("cvmfs-publisher dlq: cannot reach RabbitMQ at %s:%s (%s)" % (
            config["amqp.host"], config["amqp.port"], type(exc).__name__), file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as exc:
        print("cvmfs-publisher dlq: the broker refused: %s" % exc, file=sys.stderr)
        return 1


def _list(dlq, filters, args, _stdin, out) -> int:
    messages = dlq.select(filters, args.limit)
    if args.json:
        print(json.dumps([m.as_dict(dlq.publisher_queue) for m in messages], indent=1), file=out)
        return 0
    print("%-4s %-20s %-24s %4s  %s" % ("#", "DEAD-LETTERED", "QUEUE", "TRY", "REASON"), file=out)
    for m in messages:
        print("%-4d %-20s %-24s %4d  %s" % (m.position, _when(m.dead_lettered_at), m.origin or "?", m.attempts,
                                            m.reason.replace("\n", " ")[:160]), file=out)
    print("%d message(s) in %s match" % (len(messages), dlq.queue), file=out)
    return 0


def _show(dlq, filters, args, _stdin, out) -> int:
    messages = dlq.select(filters, args.limit)
    if args.json:
        return _list(dlq, filters, args, _stdin, out)
    for m in messages:
        data = m.as_dict(dlq.publisher_queue)
        print("-- message %d" % m.position, file=out)
        for key in ("origin", "repository", "reason", "cause", "attempts"):
            print("%-11s %s" % (key + ":", data[key]), file=out)
        print("%-11s %s" % ("dead at:", _when(m.dead_lettered_at)), file=out)
        for index, entry in enumerate(data["history"], 1):
            print("%-11s %s" % ("history %d:" % index, json.dumps(entry, sort_keys=True)), file=out)
        print("body:\n%s" % data["body"], file=out)
    print("%d message(s) in %s match" % (len(messages), dlq.queue), file=out)
    return 0


def _replay(dlq, filters, args, _stdin, out) -> int:
    outcome = dlq.replay(filters, args.limit)
    for problem in outcome.failed:
        print("not replayed: %s" % problem, file=out)
    print("replayed %d message(s) to their queues; %d could not be replayed; %d left in %s" % (
        outcome.done, len(outcome.failed), outcome.kept, dlq.queue), file=out)
    return 1 if outcome.failed else 0


def _purge(dlq, filters, args, stdin, out) -> int:
    if not args.yes:
        count = len(dlq.select(filters, args.limit))
        if not count:
            print("no message in %s matches: nothing to purge" % dlq.queue, file=out)
            return 0
        if not stdin.isatty():
            print("cvmfs-publisher dlq purge: %d message(s) match; not a terminal, so nothing was deleted: "
                  "add --yes" % count, file=sys.stderr)
            return 1
        print("delete %d message(s) from %s for good? [y/N] " % (count, dlq.queue), end="", file=out, flush=True)
        if stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=out)
            return 1
    outcome = dlq.purge(filters, args.limit)
    print("purged %d message(s); %d left in %s" % (outcome.done, outcome.kept, dlq.queue), file=out)
    return 0


_ACTIONS = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}
