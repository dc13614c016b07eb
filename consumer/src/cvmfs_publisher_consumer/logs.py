"""JSON-lines logging to stdout: one object per line, with the fields a log pipeline filters on.

Extra fields go in ``extra={"fields": {...}}``. Every line passes through the redactor, so a secret the daemon
knows (its RabbitMQ password, the contents of the secret files its vars files name) cannot reach the log even
if some library puts it into an exception message.
"""
import json
import logging
import sys
import time

from .redact import Redactor


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets=()):
        super().__init__()
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, default=str, ensure_ascii=False))


def setup(level: str = "INFO", secrets=(), stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pika logs every reconnect attempt at ERROR with a traceback; the daemon reports them once, itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    return handler


def fields(**values):
    """``log.info("...", extra=fields(repository=...))``"""
    return {"fields": values}
