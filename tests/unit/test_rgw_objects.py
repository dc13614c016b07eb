"""_rgw/objects.py's listing against an in-memory bucket that answers ListObjectsV2 as S3 does (prefix, "/"
delimiter, 1,000 keys a page, continuation tokens): what it lists, and how many requests it takes."""
from urllib.parse import quote_plus

import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import BucketObjects

PAGE = 1000


class MemoryBucket(BucketObjects):
    def __init__(self, keys, concurrency):
        super().__init__("bucket", connect=lambda: None, concurrency=concurrency)
        self.keys = sorted(keys)
        self.requests = []

    def _list_page(self, prefix, token, delimiter=None):
        self.requests.append((prefix, token, delimiter))
        entries, folders = [], []
        for key in (k for k in self.keys if k.startswith(prefix) and (not token or k > token)):
            if delimiter and delimiter in key[len(prefix):]:
                folder = prefix + key[len(prefix):].split(delimiter)[0] + delimiter
                if folders and folders[-1] == folder:
                    continue
                folders.append(folder)
                entries.append(("folder", folder))
            else:
                entries.append(("key", key))
            if len(entries) > PAGE:
                break
        truncated = len(entries) > PAGE
        entries = entries[:PAGE]
        last = entries[-1][1] if entries else ""
        if last.endswith("/") and entries[-1][0] == "folder":
            last = last[:-1] + chr(0x10FFFF)   # past every key of that folder
        body = ['<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">']
        for kind, name in entries:
            if kind == "key":
                body.append("<Contents><Key>%s</Key><ETag>\"e-%s\"</ETag><Size>1</Size></Contents>"
                            % (quote_plus(name, safe="/"), len(name)))
            else:
                body.append("<CommonPrefixes><Prefix>%s</Prefix></CommonPrefixes>" % quote_plus(name, safe="/"))
        body.append("<IsTruncated>%s</IsTruncated>" % ("true" if truncated else "false"))
        if truncated:
            body.append("<NextContinuationToken>%s</NextContinuationToken>" % quote_plus(last, safe="/"))
        body.append("</ListBucketResult>")
        return "".join(body).encode()


def listed(bucket):
    return sorted(obs.key for obs in bucket.list("cvmfs/"))


@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_prefix_that_fits_in_one_page_is_one_request(concurrency):
    keys = ["cvmfs/d%02d/f%d" % (i % 100, i) for i in range(500)] + ["other/x"]
    bucket = MemoryBucket(keys, concurrency)
    assert listed(bucket) == sorted(k for k in keys if k.startswith("cvmfs/"))
    assert bucket.requests == [("cvmfs/", None, None)], "100 folders, 500 keys: one listing request, not 101"


@pytest.mark.parametrize("concurrency", [2, 8, 16])
def test_a_larger_prefix_is_listed_by_folders_and_sees_exactly_the_same(concurrency):
    keys = ["cvmfs/d%02d/f%05d" % (i % 30, i) for i in range(3500)] + ["cvmfs/top", "cvmfs/a/b/c", "cvmfs//x"]
    parallel, sequential = MemoryBucket(keys, concurrency), MemoryBucket(keys, 1)
    assert listed(parallel) == listed(sequential) == sorted(keys)
    assert len(sequential.requests) == 4, "3,503 keys: four pages one after another"
    assert parallel.requests[0] == ("cvmfs/", None, None), "the first page decides"
    assert ("cvmfs/", None, "/") in parallel.requests, "then the folders, in parallel"
