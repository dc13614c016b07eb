"""Packaging rules that span files: the modules' documented action groups match meta/runtime.yml; one version
(galaxy.yml's) for the collection and the consumer wheel; ranges for the modules, pins for the daemon."""
import importlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import VENV_BIN, ansible_env
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = "infn_cloud.cvmfs_publisher"
MODULES = sorted(p.stem for p in (ROOT / "plugins/modules").glob("*.py") if not p.name.startswith("_"))


def action_group_members(groups, name):
    """The modules of one action group of meta/runtime.yml, groups it extends included."""
    members = set()
    for entry in groups[name]:
        if isinstance(entry, str):
            members.add(entry)
        else:
            for extended in entry.get("metadata", {}).get("extend_group", []):
                members |= action_group_members(groups, extended)
    return members


def groups_of(groups, module):
    return {f"{COLLECTION}.{name}" for name in groups if module in action_group_members(groups, name)}


def test_action_group_members_follow_extend_group():
    groups = {"a": ["m1"], "b": ["m2", {"metadata": {"extend_group": ["a"]}}]}
    assert action_group_members(groups, "b") == {"m1", "m2"}


@pytest.mark.parametrize("module", MODULES)
def test_module_documents_every_action_group_it_belongs_to(module):
    """`attributes.action_group.membership` lists exactly the groups meta/runtime.yml puts the module in, `all`
    included (it extends the others), and the description names each of them."""
    groups = yaml.safe_load((ROOT / "meta/runtime.yml").read_text())["action_groups"]
    doc = yaml.safe_load(importlib.import_module(f"ansible_collections.{COLLECTION}.plugins.modules.{module}")
                         .DOCUMENTATION)
    action_group = doc["attributes"]["action_group"]
    expected = groups_of(groups, module)
    assert f"{COLLECTION}.all" in expected, f"{module} is in no action group of meta/runtime.yml"
    assert set(action_group["membership"]) == expected, f"{module}: documented {action_group['membership']}"
    for group in expected:
        assert f"C(group/{group})" in action_group["description"], f"{module}: description does not name {group}"


# -- one version: galaxy.yml's, for the collection and the consumer wheel --------------------------------------

def galaxy_version():
    return str(yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"])


def consumer_setup():
    """consumer/setup.py as a module (setup() runs only as __main__, the way setuptools runs it)."""
    spec = importlib.util.spec_from_file_location("consumer_setup", ROOT / "consumer/setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_consumer_version_is_galaxy_yml_version_in_a_checkout():
    assert consumer_setup().collection_version() == galaxy_version()


def test_consumer_version_comes_from_the_installed_collection_manifest(tmp_path):
    (tmp_path / "consumer").mkdir()
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"collection_info": {"version": "4.5.6"}}))
    assert consumer_setup().collection_version(tmp_path / "consumer") == "4.5.6"


def test_consumer_version_comes_from_pkg_info_in_its_sdist(tmp_path):
    (tmp_path / "galaxy.yml").write_text("version: 1.0.0\n")
    (tmp_path / "consumer").mkdir()
    (tmp_path / "consumer/PKG-INFO").write_text("Metadata-Version: 2.1\nName: cvmfs-publisher-consumer\n"
                                                "Version: 7.8.9\n")
    assert consumer_setup().collection_version(tmp_path / "consumer") == "7.8.9"


def test_consumer_version_refuses_to_guess(tmp_path):
    (tmp_path / "consumer").mkdir()
    with pytest.raises(SystemExit, match="cannot tell the consumer's version: no PKG-INFO here and no galaxy.yml"):
        consumer_setup().collection_version(tmp_path / "consumer")


def test_consumer_wheel_takes_its_version_from_galaxy_yml(tmp_path):
    """A real build (python -m build, no isolation: setuptools from the venv) of a copy whose galaxy.yml says
    9.8.7: the wheel's name and metadata carry that version and nothing else."""
    shutil.copytree(ROOT / "consumer", tmp_path / "consumer", ignore=shutil.ignore_patterns(
        "tests", "*.egg-info", "__pycache__", "build", "dist"))
    (tmp_path / "galaxy.yml").write_text((ROOT / "galaxy.yml").read_text().replace(
        "version: %s\n" % galaxy_version(), "version: 9.8.7\n"))
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir",
                           str(tmp_path / "dist"), str(tmp_path / "consumer")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = [p.name for p in (tmp_path / "dist").iterdir()]
    assert wheels == ["cvmfs_publisher_consumer-9.8.7-py3-none-any.whl"]
    with zipfile.ZipFile(tmp_path / "dist" / wheels[0]) as wheel:
        metadata = wheel.read("cvmfs_publisher_consumer-9.8.7.dist-info/METADATA").decode()
        assert "\nVersion: 9.8.7\n" in metadata
        assert "cvmfs-publisher = cvmfs_publisher_consumer.cli:main" in wheel.read(
            "cvmfs_publisher_consumer-9.8.7.dist-info/entry_points.txt").decode()


def test_publisher_role_refuses_a_wheel_of_another_version(tmp_path):
    """The publisher role installs one version: a consumer wheel whose version is not the collection tarball's
    stops the play before anything reaches the host, naming both files and versions."""
    tarball = tmp_path / "infn_cloud-cvmfs_publisher-1.2.3.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, text in [("MANIFEST.json", json.dumps({"collection_info": {"version": "1.2.3"},
                                                         "file_manifest_file": {"chksum_sha256": "0" * 64}})),
                           ("consumer/requirements.txt", "pika==1.4.4\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    wheel = tmp_path / "cvmfs_publisher_consumer-9.9.9-py3-none-any.whl"
    wheel.write_bytes(b"")
    playbook = tmp_path / "install.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"ansible.builtin.include_role": {"name": f"{COLLECTION}.publisher", "tasks_from": "install.yml"},
                   "vars": {"cvmfs_publisher_collection_tarball": str(tarball),
                            "cvmfs_publisher_consumer_wheel": str(wheel),
                            "cvmfs_publisher_install_dir": str(tmp_path / "opt"),
                            "cvmfs_publisher_os_packages": [], "cvmfs_publisher_create_user": False}}]}]))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(playbook), "--check"], cwd=str(ROOT),
                          env=ansible_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout
    assert f"the consumer wheel {wheel} is version 9.9.9 but the collection tarball {tarball} is version 1.2.3" \
        in " ".join(proc.stdout.split()), proc.stdout
    assert not (tmp_path / "opt").exists()


# -- requirements: ranges for the modules, pins for the daemon ---------------------------------------------------

def requirements(path):
    lines = (ROOT / path).read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()
            and not line.startswith("-")]
    return {canonicalize_name(req.name): req for req in reqs}


def test_module_requirements_are_ranges_and_the_daemon_pins_each_inside_its_range():
    ranges = requirements("requirements.txt")
    pins = requirements("consumer/requirements.txt")
    assert set(ranges) == {"hvac", "boto3", "botocore"}
    for name, req in ranges.items():
        assert req.specifier and all(spec.operator == ">=" for spec in req.specifier), \
            f"{name}: requirements.txt has {req.specifier}, lower bounds only (execution environments combine them)"
        assert name in pins, f"consumer/requirements.txt does not pin {name}"
        (pin,) = pins[name].specifier
        assert pin.operator == "==" and req.specifier.contains(pin.version), \
            f"{name}: the daemon's pin {pin.version} is outside the modules' range {req.specifier}"


def test_daemon_pins_everything_the_consumer_needs():
    pins = requirements("consumer/requirements.txt")
    assert all(len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==" for req in pins.values())
    pyproject = tomllib.loads((ROOT / "consumer/pyproject.toml").read_text())
    for dependency in map(Requirement, pyproject["project"]["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"consumer/requirements.txt does not pin {name}"
        assert dependency.specifier.contains(next(iter(pins[name].specifier)).version), name


def test_requires_ansible_is_the_ansible_core_minor_that_is_tested():
    """meta/runtime.yml promises the ansible-core release make lint runs ansible-test sanity with (the daemon's
    pin, which the dev venv installs), its whole minor and nothing else."""
    promised = SpecifierSet(yaml.safe_load((ROOT / "meta/runtime.yml").read_text())["requires_ansible"])
    (pin,) = requirements("consumer/requirements.txt")["ansible-core"].specifier
    major, minor, _ = pin.version.split(".")
    assert promised.contains(pin.version) and promised.contains(f"{major}.{minor}.0"), promised
    assert not promised.contains(f"{major}.{int(minor) - 1}.99"), f"{promised} promises an untested older minor"
    assert not promised.contains(f"{major}.{int(minor) + 1}.0"), f"{promised} promises an untested newer minor"
    import ansible.release
    assert ansible.release.__version__ == pin.version, "the venv runs another ansible-core than the pin"
