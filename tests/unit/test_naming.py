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
