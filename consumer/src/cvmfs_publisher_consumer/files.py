"""Writing a file so that readers (the status page, ``status``, ansible-runner) see the old content or the new,
never half of it."""
import os
import tempfile
from typing import Optional


def write_text_atomic(path: str, text: str, mode: Optional[int] = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8): a temporary file beside it, then a rename; ``mode`` is set before
    the rename. The temporary file is removed on any failure; errors propagate."""
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(text)
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
