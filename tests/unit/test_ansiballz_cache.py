"""plugin_utils/_ansiballz_cache.py: the lasting AnsiballZ payload cache shared by ansible-playbook processes."""
import base64
import dataclasses
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.plugin_utils import _ansiballz_cache as cache


def _collection(tmp_path):
    root = tmp_path / "collection"
    for folder, name, text in (("modules", "m.py", "print('m')\n"), ("module_utils", "_u.py", "X = 1\n"),
                               ("module_utils/_pkg", "a.py", "A = 1\n"), ("action", "m.py", "action\n")):
        (root / "plugins" / folder).mkdir(parents=True, exist_ok=True)
        (root / "plugins" / folder / name).write_text(text)
    return root


def test_the_key_follows_every_payload_source_and_ansible_core_version(tmp_path):
    root = _collection(tmp_path)
    key = cache.payload_key(str(root), "2.19.0")
    assert key == cache.payload_key(str(root), "2.19.0")
    assert cache.payload_key(str(root), "2.19.1") != key, "another ansible-core builds other payloads"
    (root / "plugins/module_utils/_pkg/a.py").write_text("A = 2\n")
    changed = cache.payload_key(str(root), "2.19.0")
    assert changed != key, "a changed module_utils file (even in a package) must not meet an old payload"
    (root / "plugins/modules/new.py").write_text("")
    assert cache.payload_key(str(root), "2.19.0") != changed, "a new module too"
    before = cache.payload_key(str(root), "2.19.0")
    (root / "plugins/action/m.py").write_text("other\n")
    assert cache.payload_key(str(root), "2.19.0") == before, "action plugins are not in any payload"


def test_share_links_this_process_cache_to_the_lasting_folder_once(tmp_path):
    local_tmp = tmp_path / "tmp" / "ansible-local-123abc"
    local_tmp.mkdir(parents=True)
    lasting = cache.share(str(local_tmp))
    link = local_tmp / "ansiballz_cache"
    assert lasting and os.path.islink(link) and os.path.realpath(link) == lasting
    assert os.path.dirname(lasting) == str(tmp_path / "tmp"), "beside the per-process folders, so it outlives them"
    assert os.path.basename(lasting).startswith("infn_cloud.cvmfs_publisher-ansiballz-")
    assert oct(os.stat(lasting).st_mode & 0o777) == "0o700"
    (link / "payload").write_text("built once")
    assert cache.share(str(local_tmp)) == lasting, "a later task of the same run keeps the link"
    shutil.rmtree(local_tmp)  # what ansible-playbook does at exit: the link goes, the payloads stay
    assert (tmp_path / "tmp" / os.path.basename(lasting) / "payload").read_text() == "built once"
    again = tmp_path / "tmp" / "ansible-local-456def"
    again.mkdir()
    assert cache.share(str(again)) == lasting and (again / "ansiballz_cache" / "payload").exists()


def test_a_cache_folder_ansible_made_itself_is_left_alone(tmp_path):
    local_tmp = tmp_path / "ansible-local-1"
    (local_tmp / "ansiballz_cache").mkdir(parents=True)
    assert cache.share(str(local_tmp)) is None
    assert not os.path.islink(local_tmp / "ansiballz_cache")


def test_an_unwritable_place_leaves_ansible_to_build_the_payload(tmp_path):
    assert cache.share(str(tmp_path / "missing" / "ansible-local-1")) is None


def test_lasting_folders_unused_for_a_week_are_pruned_when_a_run_links_another(tmp_path):
    base = tmp_path / "tmp"
    old, recent, other = (base / (cache._PREFIX + "old")), (base / (cache._PREFIX + "recent")), base / "unrelated"
    for folder in (old, recent, other):
        (folder).mkdir(parents=True)
        (folder / "payload").write_text("x")
    week_ago = os.stat(recent).st_mtime - cache.PRUNE_AFTER - 60
    os.utime(old, (week_ago, week_ago))
    os.utime(other, (week_ago, week_ago))
    local_tmp = base / "ansible-local-1"
    local_tmp.mkdir()
    lasting = cache.share(str(local_tmp))
    assert lasting and os.path.isdir(lasting)
    assert not old.exists(), "an older collection's payloads, unused for a week, go"
    assert recent.exists() and other.exists(), "used lately, or not ours: kept"
    assert cache.prune(str(base), keep=lasting) == []
    os.utime(lasting, (week_ago, week_ago))
    again = base / "ansible-local-2"
    again.mkdir()
    assert cache.share(str(again)) == lasting and os.path.isdir(lasting)
    assert os.stat(lasting).st_mtime > week_ago + cache.PRUNE_AFTER, "linking marks the folder used again"



@dataclasses.dataclass(frozen=True)
class CachedPayload:
    """Shaped like ansible-core's cached payload (module_common._CachedModule): frozen, zip_data in base64."""
    zip_data: bytes
    metadata: str


def _payload(path, files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    path.write_bytes(pickle.dumps(CachedPayload(zip_data=base64.b64encode(buffer.getvalue()), metadata="m")))
    return path


def _cached(path):
    return pickle.loads(path.read_bytes())


def _imports(zip_path):
    """What ``pkg.m.VALUE`` is when a fresh Python imports it from the zip."""
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import pkg.m; "
                            "print(pkg.m.VALUE)", str(zip_path)], capture_output=True, text=True)
    return probe.stdout.strip() or probe.stderr


def test_payloads_get_bytecode_once_and_python_imports_it(tmp_path):
    """Each payload gets a .pyc beside every .py, once, and Python's zipimport takes the bytecode: the module
    imports even when the source beside it is made uncompilable."""
    lasting = tmp_path / "lasting"
    lasting.mkdir()
    payload = _payload(lasting / "mod-ZIP_DEFLATED-none", {
        "pkg/__init__.py": "", "pkg/m.py": "from __future__ import annotations\nVALUE = 'from bytecode'\n"})
    (lasting / "mod-ZIP_DEFLATED-none.lock").write_text("")
    assert cache.add_bytecode(str(lasting)) == ["mod-ZIP_DEFLATED-none"]
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(_cached(payload).zip_data)))
    assert sorted(archive.namelist()) == ["pkg/__init__.py", "pkg/__init__.pyc", "pkg/m.py", "pkg/m.pyc"]
    assert _cached(payload).metadata == "m", "the rest of the cached payload is kept"
    before = payload.stat()
    assert cache.add_bytecode(str(lasting)) == [], "once per payload"
    assert payload.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(lasting)) == ["mod-ZIP_DEFLATED-none", "mod-ZIP_DEFLATED-none.bytecode",
                                           "mod-ZIP_DEFLATED-none.lock"], "no temporary file left"

    runnable = tmp_path / "run.zip"
    with zipfile.ZipFile(runnable, "w") as out:
        for info in archive.infolist():
            out.writestr(info, b"this is not python" if info.filename == "pkg/m.py" else archive.read(info))
    assert _imports(runnable) == "from bytecode"


def test_bytecode_of_another_python_gives_way_to_the_source(tmp_path):
    """A .pyc with a foreign magic number (the module runs on another Python version): the .py is compiled."""
    runnable = tmp_path / "run.zip"
    with zipfile.ZipFile(runnable, "w") as out:
        out.writestr("pkg/__init__.py", "")
        out.writestr("pkg/m.py", "VALUE = 'from source'\n")
        out.writestr("pkg/m.pyc", b"\x00\x00\r\n" + b"\x01\x00\x00\x00" + b"\x00" * 8 + b"garbage")
    assert _imports(runnable) == "from source"


def test_a_payload_it_cannot_read_is_left_as_it_is_and_not_tried_again(tmp_path, monkeypatch):
    lasting = tmp_path / "lasting"
    lasting.mkdir()
    (lasting / "odd-ZIP_DEFLATED-none").write_bytes(b"not a pickle")
    assert cache.add_bytecode(str(lasting)) == []
    assert (lasting / "odd-ZIP_DEFLATED-none").read_bytes() == b"not a pickle"
    assert sorted(os.listdir(lasting)) == ["odd-ZIP_DEFLATED-none", "odd-ZIP_DEFLATED-none.bytecode",
                                           "odd-ZIP_DEFLATED-none.lock"], "given up once, no part file left"
    tried = []
    real_load = pickle.load
    monkeypatch.setattr(pickle, "load", lambda handle: tried.append(handle) or real_load(handle))
    assert cache.add_bytecode(str(lasting)) == [] and tried == [], "not tried again after every task"
    assert cache.add_bytecode(str(tmp_path / "missing")) == []
