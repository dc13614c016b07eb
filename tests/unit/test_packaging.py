"""Packaging rules that span files: what the modules' documentation promises matches meta/runtime.yml."""
import importlib
from pathlib import Path

import pytest
import yaml

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
