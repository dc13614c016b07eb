# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Writing a file so that readers see the old content or the new, never half of it.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import tempfile


def write_atomically(path, data, mode=None, uid=None, gid=None):
    """Replace ``path`` with ``data`` (bytes, or text written as UTF-8): a temporary file in the same folder, its
    mode and owner set before any byte is written (a secret is never readable by others, even briefly), flushed
    to disk, then renamed over ``path``. The temporary file is removed on any failure; errors propagate."""
    if not isinstance(data, bytes):
        data = data.encode("utf-8")
    folder = os.path.dirname(path) or "."
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=".%s." % os.path.basename(path))
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        with os.fdopen(fd, "wb") as handle:
            fd = None
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp_path, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise
