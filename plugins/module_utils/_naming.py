# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Naming rules shared by every module: the one place that says what a repository is called where.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

A repository's fully qualified name (fqrn) is ``<name>.<domain>``. Its short name ``<name>`` is also the S3
bucket, the RGW topic, the RabbitMQ queue and the routing key (the original INFN convention).

Pure (only ``re``): roles and playbooks use it through the ``short_name`` filter plugin, and the consumer daemon,
which must not import the collection, carries a copy (consumer/src/cvmfs_publisher_consumer/naming.py) that
tests/unit/test_naming.py holds equal to this file.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

# cvmfs_server_util.sh::is_valid_repo_name
FQRN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")
# S3 bucket names are DNS labels; RGW (newer releases) rejects dots in topic names.
SHORT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
# Vault path segments: the subject is an OIDC `sub` (often a UUID), the group a plain name.
VAULT_SEGMENT_PATTERN = re.compile(r"^[A-Za-z0-9@][A-Za-z0-9_.@-]{0,127}$")

DEFAULT_EXCHANGE = "notification"
DEFAULT_PREFIX = "cvmfs/"
DEFAULT_NOTIFICATION_ID = "cvmfs-publisher"


class InvalidName(ValueError):
    """A name that CVMFS, S3, RGW or RabbitMQ would refuse, with a message saying why."""


def validate_fqrn(fqrn):
    """Return fqrn if it is a valid, fully qualified CVMFS repository name; raise InvalidName otherwise."""
    if not isinstance(fqrn, str) or not fqrn:
        raise InvalidName("repository name is empty")
    if len(fqrn) > 60:
        raise InvalidName("invalid repository name %r: longer than 60 characters" % fqrn)
    if not FQRN_PATTERN.match(fqrn):
        raise InvalidName(
            "invalid repository name %r: CVMFS allows only letters, digits, '-', '_' and '.', "
            "starting with a letter or digit" % fqrn)
    if "." not in fqrn:
        raise InvalidName("invalid repository name %r: expected a fully qualified name <name>.<domain>" % fqrn)
    if ".." in fqrn or fqrn.endswith("."):
        raise InvalidName("invalid repository name %r: empty domain label" % fqrn)
    short = short_name(fqrn, validate=False)
    if not SHORT_NAME_PATTERN.match(short):
        raise InvalidName(
            "invalid repository name %r: its short name %r must also be a valid bucket, topic and queue name "
            "(3-63 lowercase letters, digits or '-', not starting or ending with '-')" % (fqrn, short))
    return fqrn


def short_name(fqrn, validate=True):
    """`alice.infn.it` -> `alice`: the bucket, topic, queue and routing key of a repository.

    ``validate=False`` only takes the part before the first dot, for names checked already or for filters."""
    return (validate_fqrn(fqrn) if validate else fqrn).split(".", 1)[0]


def bucket_name(fqrn):
    return short_name(fqrn)


def topic_name(fqrn):
    return short_name(fqrn)


def queue_name(fqrn):
    return short_name(fqrn)


def routing_key(fqrn):
    return short_name(fqrn)


def validate_vault_segment(value, what):
    if not isinstance(value, str) or not VAULT_SEGMENT_PATTERN.match(value):
        raise InvalidName("invalid %s %r: expected letters, digits, '_', '.', '@' or '-'" % (what, value))
    return value


def vault_keys_path(fqrn, subject=None, group=None):
    """The KV v2 secret path (relative to the mount) holding a repository's keys.

    personal: ``<subject>/cvmfs_keys/<fqrn>``; group: ``groups/<group>/cvmfs_keys/<fqrn>``.
    """
    validate_fqrn(fqrn)
    if bool(subject) == bool(group):
        raise InvalidName("exactly one of subject (personal repository) or group (group repository) is required")
    if subject:
        return "%s/cvmfs_keys/%s" % (validate_vault_segment(subject, "subject"), fqrn)
    return "groups/%s/cvmfs_keys/%s" % (validate_vault_segment(group, "group"), fqrn)


def topic_arn(fqrn, zonegroup="default", tenant=""):
    """The ARN RGW gives a topic: ``arn:aws:sns:<zonegroup>:<tenant>:<topic>``."""
    return "arn:aws:sns:%s:%s:%s" % (zonegroup, tenant, topic_name(fqrn))
