"""The consumer's version is the collection's: `version` in ../galaxy.yml, the one place it is written.

Read from, in order: PKG-INFO (building the wheel from this package's sdist, where ../ is gone), ../galaxy.yml
(a source checkout) or ../MANIFEST.json (the consumer/ folder of an installed collection tarball). Everything
else about the package is in pyproject.toml.
"""
import json
import re
from email.parser import HeaderParser
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def collection_version(here=HERE):
    pkg_info = here / "PKG-INFO"
    if pkg_info.is_file():
        return HeaderParser().parsestr(pkg_info.read_text(encoding="utf-8"))["Version"]
    galaxy = here.parent / "galaxy.yml"
    if galaxy.is_file():
        match = re.search(r"^version:\s*['\"]?([^'\"\s#]+)", galaxy.read_text(encoding="utf-8"), re.MULTILINE)
        if not match:
            raise SystemExit("%s has no version: line" % galaxy)
        return match.group(1)
    manifest = here.parent / "MANIFEST.json"
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["collection_info"]["version"]
    raise SystemExit("cannot tell the consumer's version: no PKG-INFO here and no galaxy.yml or MANIFEST.json in "
                     "%s (build it from the collection's consumer/ folder)" % here.parent)


if __name__ == "__main__":
    setup(version=collection_version())
