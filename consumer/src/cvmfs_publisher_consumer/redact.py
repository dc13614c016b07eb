"""The one redactor: every secret the daemon knows (its RabbitMQ password, the contents of the secret files its
vars files name) replaced by ``********`` in log lines, run error summaries and kept run artifacts; and where those
secrets are read from."""
import json
from typing import Iterable, List

import yaml

from .config import read_secret

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


def known_secrets(config) -> List[str]:
    """Every secret the daemon can know of, to scrub from logs and kept runs: never logged themselves."""
    return [read_secret(config["amqp.password_file"])] + secret_values(config["ansible.extravars_files"])


def secret_values(extravars_files: Iterable[str], extra_paths: Iterable[str] = ()) -> List[str]:
    """Contents of the secret files the operator's vars files point at (keys ending in ``_file``).

    Read only to scrub them from kept artifacts and error messages, never logged.
    """
    paths = list(extra_paths)
    for vars_file in extravars_files:
        try:
            with open(vars_file, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            paths.extend(v for k, v in data.items() if str(k).endswith("_file") and isinstance(v, str))
    values = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            values.append(value)
    return values
