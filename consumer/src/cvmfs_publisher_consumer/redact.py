"""The one redactor: every secret the daemon knows (its RabbitMQ password, the contents of the secret files its
vars files name) replaced by ``********`` in log lines, run error summaries and kept run artifacts."""
import json
from typing import Iterable

REDACTED = "********"


class Redactor:
    """``redactor(text)`` is ``text`` with each secret (and its JSON-escaped form) replaced, longest first.

    Secrets shorter than ``min_length`` are left alone (a 1-3 character "secret" would blank every log line)."""

    def __init__(self, secrets: Iterable[str] = (), min_length: int = 4):
        self.secrets = sorted({s for s in secrets if s and len(s) >= min_length}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
            escaped = json.dumps(secret)[1:-1]
            if escaped != secret:
                text = text.replace(escaped, REDACTED)
        return text
