"""Building test tarballs from a compact member list (shared by unit and integration tests).

A member is ``(kind, name, data)``: kind ``file`` (data = bytes), ``dir``, ``sym`` / ``hard`` (data = link
target), ``chr`` / ``fifo`` (data ignored).
"""
import io
import tarfile

_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
          "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}


def tarball_bytes(members, compress=False):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as archive:
        for kind, name, *rest in members:
            data = rest[0] if rest else b""
            info = tarfile.TarInfo(name)
            info.type = _TYPES[kind]
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind in ("sym", "hard"):
                info.linkname = data
            if kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def build_tarball(path, members, compress=False):
    path.write_bytes(tarball_bytes(members, compress))
    return path
