import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _naming as naming


@pytest.mark.parametrize("fqrn", ["alice.infn.it", "atlas-sw.cern.ch", "a0b.example.org", "abc.d"])
def test_valid_names(fqrn):
    assert naming.validate_fqrn(fqrn) == fqrn


@pytest.mark.parametrize("fqrn,reason", [
    ("", "empty"),
    ("alice", "fully qualified"),
    ("-alice.infn.it", "only letters, digits"),
    (".alice.infn.it", "only letters, digits"),
    ("al ice.infn.it", "only letters, digits"),
    ("alice/../x.infn.it", "only letters, digits"),
    ("a" * 56 + ".infn", "longer than 60"),
    ("alice..infn.it", "empty domain label"),
    ("alice.infn.it.", "empty domain label"),
    ("Alice.infn.it", "short name 'Alice'"),
    ("al_ice.infn.it", "short name 'al_ice'"),
    ("ab.infn.it", "short name 'ab'"),
    ("alice-.infn.it", "short name"),
])
def test_invalid_names_say_why(fqrn, reason):
    with pytest.raises(naming.InvalidName) as err:
        naming.validate_fqrn(fqrn)
    assert reason in str(err.value)


def test_names_derived_from_the_repository():
    assert naming.short_name("alice.infn.it") == "alice"
    assert naming.bucket_name("alice.infn.it") == naming.topic_name("alice.infn.it") == "alice"
    assert naming.queue_name("alice.infn.it") == naming.routing_key("alice.infn.it") == "alice"
    assert naming.topic_arn("alice.infn.it") == "arn:aws:sns:default::alice"


def test_vault_paths_personal_and_group():
    assert naming.vault_keys_path("alice.infn.it", subject="0a1b-2c") == "0a1b-2c/cvmfs_keys/alice.infn.it"
    assert naming.vault_keys_path("atlas.infn.it", group="atlas") == "groups/atlas/cvmfs_keys/atlas.infn.it"


@pytest.mark.parametrize("kwargs,reason", [
    ({}, "exactly one of subject"),
    ({"subject": "a", "group": "b"}, "exactly one of subject"),
    ({"subject": "../etc"}, "invalid subject"),
    ({"group": "a/b"}, "invalid group"),
])
def test_vault_paths_refuse_bad_owners(kwargs, reason):
    with pytest.raises(naming.InvalidName) as err:
        naming.vault_keys_path("alice.infn.it", **kwargs)
    assert reason in str(err.value)


# -- one rule, three users: modules, roles (the filter plugin), the consumer daemon (its copy) ------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
VENDOR_NOTE = ("# A copy of plugins/module_utils/_naming.py (tests/unit/test_naming.py holds them equal): edit that "
               "file, copy it here.\n")


def test_the_consumer_carries_this_file_unchanged():
    """The consumer must not import the collection, so it vendors _naming.py; a change here must be copied."""
    original = (ROOT / "plugins/module_utils/_naming.py").read_text()
    vendored = (ROOT / "consumer/src/cvmfs_publisher_consumer/naming.py").read_text()
    assert vendored == VENDOR_NOTE + original, (
        "consumer/src/cvmfs_publisher_consumer/naming.py differs from plugins/module_utils/_naming.py: copy it "
        "(keeping the first comment line)")


def test_short_name_without_validation_only_cuts_at_the_first_dot():
    assert naming.short_name("alice.infn.it") == "alice"
    assert naming.short_name("Not Valid.x.y", validate=False) == "Not Valid"
    assert naming.short_name("alice", validate=False) == "alice"
    with pytest.raises(naming.InvalidName, match="expected a fully qualified name"):
        naming.short_name("alice")


def test_short_name_filter_plugin():
    from ansible.errors import AnsibleFilterError

    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.filter.short_name import FilterModule
    short = FilterModule().filters()["short_name"]
    assert short("atlas-sw.cern.ch") == "atlas-sw"
    with pytest.raises(AnsibleFilterError, match="invalid repository name 'Alice.infn.it': its short name 'Alice'"):
        short("Alice.infn.it")


def test_the_consumer_rules_are_these_rules():
    """The consumer's message checks report the collection's reasons (its MessageError wraps InvalidName)."""
    import sys
    sys.path.insert(0, str(ROOT / "consumer/src"))
    from cvmfs_publisher_consumer import messages
    for fqrn in ("alice", "al ice.infn.it", "Alice.infn.it", "alice..infn.it"):
        with pytest.raises(naming.InvalidName) as expected:
            naming.validate_fqrn(fqrn)
        with pytest.raises(messages.MessageError) as got:
            messages.validate_fqrn(fqrn)
        assert str(got.value) == str(expected.value)
    assert messages.validate_fqrn("alice.infn.it", "infn.it") == "alice.infn.it"
