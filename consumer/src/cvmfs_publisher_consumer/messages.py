"""What the daemon reads from its queues: provisioning requests and S3 object events. Pure: no I/O.

Every problem raises MessageError whose text is the dead-letter reason an operator reads, so it names the
field and the offending value (values are user input, never secrets).

The consumer does not import the collection (design.md): the repository name rules come from ``naming.py``, a
copy of the collection's plugins/module_utils/_naming.py that tests/unit/test_naming.py holds equal to it.
"""
import json
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import unquote_plus

from . import naming

CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


class MessageError(ValueError):
    """The message cannot be processed, ever: it goes to the dead-letter queue with this text as reason."""


def short_name(fqrn: str) -> str:
    """The part before the first dot: a repository's bucket and queue (no validation: also for filters)."""
    return naming.short_name(fqrn, validate=False)


def validate_fqrn(fqrn, domain: str = "") -> str:
    try:
        naming.validate_fqrn(fqrn)
    except naming.InvalidName as exc:
        raise MessageError(str(exc)) from None
    if domain and not fqrn.endswith("." + domain):
        raise MessageError("repository %r is not in this publisher's domain %r" % (fqrn, domain))
    return fqrn


def _segment(value, what) -> str:
    try:
        return naming.validate_vault_segment(value, what)
    except naming.InvalidName as exc:
        raise MessageError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# Provisioning requests (the `publisher` queue)

@dataclass(frozen=True)
class ProvisionRequest:
    repository: str
    subject: Optional[str] = None   # personal repository: the owner's OIDC subject
    group: Optional[str] = None     # group repository: the group name
    owner: str = ""                 # the requesting user (informational)
    form: str = "json"              # "csv" (original plain text) or "json"


def _decode_text(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("message is not UTF-8 text") from None
    if not text.strip():
        raise MessageError("message is empty")
    return text.strip()


def parse_provision(body: bytes, domain: str = "") -> ProvisionRequest:
    """The original plain text ``AAIusername,subject,repository_name,P|G`` or versioned JSON."""
    text = _decode_text(body)
    if text.startswith("{"):
        return _parse_provision_json(text, domain)
    fields = text.split(",")
    if len(fields) != 4:
        raise MessageError("plain-text provisioning message must have 4 comma-separated fields "
                           "AAIusername,subject,repository_name,P|G; got %d" % len(fields))
    owner, subject, repository, kind = (field.strip() for field in fields)
    validate_fqrn(repository, domain)
    if kind == "P":
        return ProvisionRequest(repository, subject=_segment(subject, "subject"), owner=owner, form="csv")
    if kind == "G":
        # The original system stores group keys under groups/<short name>/.
        return ProvisionRequest(repository, group=_segment(short_name(repository), "group"), owner=owner,
                                form="csv")
    raise MessageError("plain-text provisioning message: the 4th field must be P (personal) or G (group), "
                       "got %r" % kind)


def _json_object(text: str, what: str, shape: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MessageError("%s is not valid JSON: %s" % (what, exc)) from None
    if not isinstance(data, dict):
        raise MessageError("%s must be %s" % (what, shape))
    return data


def _parse_provision_json(text, domain) -> ProvisionRequest:
    data = _json_object(text, "provisioning message", "a JSON object")
    if data.get("version") != 1:
        raise MessageError("provisioning message: unsupported version %r (this daemon reads version 1)"
                           % data.get("version"))
    allowed = {"version", "repository", "owner", "subject", "kind", "group"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MessageError("provisioning message: unknown field %r" % unknown[0])
    repository = validate_fqrn(data.get("repository"), domain)
    owner = data.get("owner", "")
    if not isinstance(owner, str):
        raise MessageError("provisioning message: owner must be a string")
    kind = data.get("kind")
    if kind == "personal":
        if data.get("group"):
            raise MessageError("provisioning message: a personal repository has no group")
        return ProvisionRequest(repository, subject=_segment(data.get("subject"), "subject"), owner=owner)
    if kind == "group":
        group = data.get("group") or short_name(repository)
        return ProvisionRequest(repository, group=_segment(group, "group"), owner=owner)
    raise MessageError("provisioning message: kind must be 'personal' or 'group', got %r" % kind)


# ---------------------------------------------------------------------------------------------------------
# S3 object events (the repositories' queues)

@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str          # decoded object key
    name: str         # event name without the "s3:" prefix, e.g. ObjectCreated:Put
    size: int = 0


def parse_s3_event(body: bytes, problems: Optional[List[str]] = None) -> List[ObjectEvent]:
    """RGW's ``{"Records":[…]}`` (raw keys, numeric sizes, no ``s3:`` prefix) and AWS's form
    (``s3:`` prefix, URL-encoded keys with '+' for space, sizes as strings). An AWS ``s3:TestEvent`` gives [].

    Each record is judged on its own: with a ``problems`` list, a malformed record is described there and the
    others are still returned; without one, the first malformed record raises MessageError."""
    data = _json_object(_decode_text(body), "event", "a JSON object with a Records list")
    if data.get("Event") == "s3:TestEvent":
        return []
    records = data.get("Records")
    if not isinstance(records, list) or not records:
        raise MessageError("event has no Records list")
    events = []
    for index, record in enumerate(records):
        try:
            events.append(_parse_record(index, record))
        except MessageError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return events


def _parse_record(index, record) -> ObjectEvent:
    where = "Records[%d]" % index
    if not isinstance(record, dict):
        raise MessageError("%s: expected an object" % where)
    name = record.get("eventName")
    if not isinstance(name, str) or not name:
        raise MessageError("%s: eventName missing" % where)
    aws_form = name.startswith("s3:")
    name = name[3:] if aws_form else name
    s3 = record.get("s3")
    bucket = s3.get("bucket") if isinstance(s3, dict) else None
    obj = s3.get("object") if isinstance(s3, dict) else None
    if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str) or not bucket["name"]:
        raise MessageError("%s: s3.bucket.name missing" % where)
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) or not obj["key"]:
        raise MessageError("%s: s3.object.key missing" % where)
    # AWS URL-encodes keys ('+' for space); RGW sends them raw, where '+' and '%' are literal.
    key = unquote_plus(obj["key"]) if aws_form else obj["key"]
    size = obj.get("size", 0)
    try:
        size = int(size) if size not in (None, "") else 0
    except (TypeError, ValueError):
        raise MessageError("%s: s3.object.size %r is not a number" % (where, size)) from None
    return ObjectEvent(bucket=bucket["name"], key=key, name=name, size=size)


# Object keys: the same verdicts as the collection's _sync_plan.object_path (a hypothesis test in
# tests/unit/test_hostile_properties.py runs both over the same generated keys and requires equal answers).
MAX_KEY_BYTES = 1024        # S3's own limit on object keys
MAX_SEGMENT_BYTES = 255     # NAME_MAX
MAX_PATH_BYTES = 4000       # below PATH_MAX with room for /cvmfs/<fqrn>/
RESERVED_SEGMENTS = {"": "an empty path segment ('//')", ".": "a '.' path segment", "..": "a '..' path segment",
                     ".cvmfsautocatalog": "'.cvmfsautocatalog', which CVMFS manages"}


def _utf8_length(text: str) -> int:
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise MessageError("object key %r is not valid UTF-8 text" % text) from None


def check_key(key: str, prefix: str) -> str:
    """The key's path inside the repository; MessageError if it could escape the repository or is reserved."""
    if not key.startswith(prefix):
        raise MessageError("object key %r is outside the prefix %r" % (key, prefix))
    if _utf8_length(key) > MAX_KEY_BYTES:
        raise MessageError("object key longer than %d bytes" % MAX_KEY_BYTES)
    relative = key[len(prefix):]
    if not relative:
        raise MessageError("object key %r is the prefix itself" % key)
    if CONTROL_CHARACTERS.search(relative):
        raise MessageError("object key %r contains control characters" % key)
    if relative.startswith("/"):
        raise MessageError("object key %r: absolute path after the prefix %r" % (key, prefix))
    if _utf8_length(relative) > MAX_PATH_BYTES:
        raise MessageError("object key %r: path longer than %d bytes" % (key, MAX_PATH_BYTES))
    segments = relative.split("/")
    for segment in segments:
        if segment in RESERVED_SEGMENTS:
            raise MessageError("object key %r has %s" % (key, RESERVED_SEGMENTS[segment]))
        if segment.startswith(".wh."):
            raise MessageError("object key %r: overlay whiteout names (.wh.*) are reserved" % key)
        if _utf8_length(segment) > MAX_SEGMENT_BYTES:
            raise MessageError("object key %r has a name longer than %d bytes" % (key, MAX_SEGMENT_BYTES))
    if segments[0] == ".cvmfs":
        raise MessageError("object key %r: .cvmfs at the top of a repository is reserved" % key)
    return relative


@dataclass(frozen=True)
class Touches:
    """What one event message means for its repository."""
    keys: Tuple[str, ...]                       # object keys to bring in line with the bucket
    ignored: Tuple[str, ...]                    # why records were skipped (for the log)
    refused: Tuple[Tuple[str, str], ...] = ()   # (key, reason): keys the publisher never publishes


def touched_keys(events: List[ObjectEvent], bucket: str, prefix: str, known_buckets=()) -> Touches:
    """Keep the records that concern ``bucket`` under ``prefix``, each record judged on its own.

    A record of another bucket (misrouted, or no repository's at all), outside the prefix or a folder marker
    is skipped with its reason; a key the publisher refuses (check_key) is listed in ``refused``. Neither
    stops the other records of the message.
    """
    keys, ignored, refused = [], [], []
    for event in events:
        if event.bucket != bucket:
            known = "another repository's" if event.bucket in known_buckets else "unknown"
            ignored.append("event for %s bucket %r, not %r" % (known, event.bucket, bucket))
            continue
        if not event.key.startswith(prefix):
            ignored.append("key %r outside the prefix %r" % (event.key, prefix))
            continue
        if event.key == prefix or event.key.endswith("/"):
            ignored.append("key %r is a folder marker" % event.key)
            continue
        if not (event.name.startswith("ObjectCreated") or event.name.startswith("ObjectRemoved")):
            ignored.append("event %r is neither a creation nor a removal" % event.name)
            continue
        try:
            check_key(event.key, prefix)
        except MessageError as exc:
            refused.append((event.key, str(exc)))
            continue
        keys.append(event.key)
    return Touches(keys=tuple(dict.fromkeys(keys)), ignored=tuple(ignored),
                   refused=tuple(dict.fromkeys(refused)))
