"""_rgw/listing.py: a ListObjectsV2 page read with regular expressions says exactly what ElementTree reads in it.

Pages are generated as RGW and S3 write them (ElementTree serialization, keys URL-encoded, quoted ETags, any text in
keys and continuation tokens), and as other servers might (no URL encoding, pretty-printed, character references,
CDATA, comments, attributes, missing elements, truncated documents). Whatever the fast reader accepts must give the
same keys, ETags, sizes, truncation and token as ElementTree; what it cannot read exactly it must hand over.
"""
from urllib.parse import quote_plus
from xml.etree import ElementTree

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import listing

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
ROOT = '<ListBucketResult xmlns="%s">' % NS
HEAD = DECLARATION + ROOT
# XML 1.0 text: no control characters but tab and newline, no surrogates.
XML_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00",
                                 min_codepoint=0x09).filter(lambda c: c in "\t\n" or ord(c) >= 0x20), max_size=12)


def page_xml(entries, truncated, token, url_encoded=True):
    """A page as RGW writes it, through ElementTree's serializer (which escapes what XML needs)."""
    root = ElementTree.Element("ListBucketResult", xmlns=NS)
    ElementTree.SubElement(root, "IsTruncated").text = "true" if truncated else "false"
    for key, etag, size in entries:
        item = ElementTree.SubElement(root, "Contents")
        ElementTree.SubElement(item, "Key").text = quote_plus(key, safe="") if url_encoded else key
        ElementTree.SubElement(item, "LastModified").text = "2026-12-03T13:26:16.387Z"
        ElementTree.SubElement(item, "ETag").text = '"%s"' % etag
        ElementTree.SubElement(item, "Size").text = str(size)
    if token is not None:
        ElementTree.SubElement(root, "NextContinuationToken").text = token
    return DECLARATION.encode() + ElementTree.tostring(root, encoding="utf-8",
                                                                            xml_declaration=False)


def as_tuple(page):
    return ([(o.key, o.etag, o.size) for o in page.observations], page.folders, page.truncated, page.token)


def reference(body):
    return as_tuple(listing._read_tree(ElementTree.fromstring(body)))


ENTRIES = st.lists(st.tuples(XML_TEXT.filter(bool), XML_TEXT, st.integers(0, 2 ** 40)), min_size=1, max_size=6)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(ENTRIES, st.booleans(), st.one_of(st.none(), XML_TEXT), st.booleans())
def test_any_page_rgw_could_write_reads_the_same_both_ways(entries, truncated, token, url_encoded):
    body = page_xml(entries, truncated, token, url_encoded)
    fast = listing._read_plain(body.decode("utf-8"))
    if url_encoded and token != "":   # RGW never writes an empty token element (<NextContinuationToken />)
        assert fast is not None, "RGW's own form must take the fast path: %r" % body
    if fast is not None:
        assert as_tuple(fast) == reference(body)
    assert as_tuple(listing.read_page(body)) == reference(body)


def test_the_fast_path_reads_rgw_s_answer():
    body = (HEAD + "<EncodingType>url</EncodingType><Name>b</Name><Prefix>cvmfs/</Prefix><MaxKeys>2</MaxKeys>"
            "<IsTruncated>true</IsTruncated><Contents><Key>cvmfs%2Fd00%2Fa+b%26c%25</Key><LastModified>x"
            "</LastModified><ETag>&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>0</Size><StorageClass>"
            "STANDARD</StorageClass><Type>Normal</Type></Contents><Contents><Key>cvmfs%2Fm</Key><ETag>&quot;"
            "0123-2&quot;</ETag><Size>7</Size></Contents><NextContinuationToken>cvmfs/m&amp;&lt;</NextContinuation"
            "Token><KeyCount>2</KeyCount></ListBucketResult>").encode()
    fast = listing._read_plain(body.decode())
    assert as_tuple(fast) == reference(body) == (
        [("cvmfs/d00/a b&c%", "d41d8cd98f00b204e9800998ecf8427e", 0), ("cvmfs/m", "0123-2", 7)], [], True,
        "cvmfs/m&<")


UNUSUAL = {
    "pretty-printed": lambda b: b.replace(b"><", b">\n  <"),
    "a character reference": lambda b: b.replace(b'"e1"', b"&#34;e1&#x22;"),
    "CDATA": lambda b: b.replace(b"<Key>", b"<Key><![CDATA[x]]>"),
    "a comment": lambda b: b.replace(b"</Contents>", b"<!-- <Key>y</Key> --></Contents>", 1),
    "an attribute": lambda b: b.replace(b"<Contents>", b'<Contents a="1">', 1),
    "a prefixed element": lambda b: b.replace(b"<Contents>", b'<s3:Contents xmlns:s3="%s">' % NS.encode(), 1)
                                     .replace(b"</Contents>", b"</s3:Contents>", 1),
    "a Contents without ETag": lambda b: b.replace(b"<ETag>", b"<X>", 1).replace(b"</ETag>", b"</X>", 1),
    "a carriage return": lambda b: b.replace(b"<IsTruncated>", b"\r\n<IsTruncated>"),
    "another namespace": lambda b: b.replace(NS.encode(), b"urn:other"),
    "CommonPrefixes": lambda b: b.replace(b"<IsTruncated>",
                                          b"<CommonPrefixes><Prefix>cvmfs%2Fd%2F</Prefix></CommonPrefixes>"
                                          b"<IsTruncated>"),
}


@pytest.mark.parametrize("variant", sorted(UNUSUAL))
def test_a_page_in_another_form_reads_as_elementtree_reads_it(variant):
    body = UNUSUAL[variant](page_xml([("cvmfs/a", "e1", 1), ("cvmfs/b&<", "e2", 2)], True, "cvmfs/b"))
    fast = listing._read_plain(body.decode("utf-8"))
    assert fast is None or as_tuple(fast) == reference(body), variant
    assert as_tuple(listing.read_page(body)) == reference(body)


def read_as_elementtree_does(body):
    """What the fast reader may do with ``body``: nothing (None), or read it exactly as ElementTree does; and where
    ElementTree finds the page malformed, read_page must say so too."""
    try:
        expected = reference(body)
    except ElementTree.ParseError:
        with pytest.raises(ElementTree.ParseError):
            listing.read_page(body)
        return None
    except (AttributeError, TypeError, ValueError):   # well-formed but not a listing: a Contents without its Key
        assert listing._read_plain(body.decode("utf-8")) is None
        return None
    try:
        fast = listing._read_plain(body.decode("utf-8"))
    except UnicodeDecodeError:
        fast = None
    assert fast is None or as_tuple(fast) == expected
    return fast


A = '<Contents><Key>cvmfs%2Fa</Key><ETag>"e1"</ETag><Size>1</Size></Contents>'
B = '<Contents><Key>cvmfs%2Fb</Key><ETag>"e2"</ETag><Size>2</Size></Contents>'
PREFIXED = '<s:%s xmlns:s="' + NS + '">%s</s:%s>'
# Pages no RGW writes, each hiding or moving something from a reader that would not parse XML (found by review).
HOSTILE = {
    "a prefixed Contents": HEAD + "<IsTruncated>false</IsTruncated>" + A
    + PREFIXED % ("Contents", '<s:Key>cvmfs%2Fb</s:Key><s:ETag>"e2"</s:ETag><s:Size>2</s:Size>', "Contents")
    + "</ListBucketResult>",
    "a prefixed IsTruncated before a plain one": HEAD + PREFIXED % ("IsTruncated", "true", "IsTruncated") + A
    + "<IsTruncated>false</IsTruncated></ListBucketResult>",
    "prefixed CommonPrefixes": HEAD + "<IsTruncated>false</IsTruncated>" + A
    + PREFIXED % ("CommonPrefixes", "<s:Prefix>cvmfs%2Fd%2F</s:Prefix>", "CommonPrefixes") + "</ListBucketResult>",
    "IsTruncated and the token inside another element": HEAD + "<IsTruncated>false</IsTruncated>" + A
    + "<X><IsTruncated>true</IsTruncated><NextContinuationToken>t</NextContinuationToken></X></ListBucketResult>",
    "the listing inside a root of no namespace": "<R>" + ROOT
    + "<IsTruncated>true</IsTruncated>" + A + "<NextContinuationToken>t</NextContinuationToken></ListBucketResult>"
    "</R>",
    "a Key from a DTD entity": '<?xml version="1.0"?><!DOCTYPE ListBucketResult [<!ENTITY k "<Key>x</Key>">]>'
    + ROOT + "<IsTruncated>false</IsTruncated>"
    + '<Contents><Key>y</Key><ETag>"Y"</ETag><Size>1</Size></Contents><Contents>&k;<ETag>"N"</ETag><Size>2</Size>'
    "</Contents></ListBucketResult>",
    "an ETag inside another element of a Contents": HEAD + "<IsTruncated>false</IsTruncated>" + A
    + '<Contents><Key>cvmfs%2Fb</Key><X><ETag>"f"</ETag></X><Size>2</Size></Contents></ListBucketResult>',
    "two Keys in one Contents, none in the next": HEAD + "<IsTruncated>false</IsTruncated>"
    + '<Contents><Key>a</Key><Key>b</Key><ETag>"1"</ETag><Size>1</Size></Contents>'
    + '<Contents><ETag>"2"</ETag><Size>2</Size></Contents></ListBucketResult>',
    "a processing instruction holding a Contents": HEAD + "<IsTruncated>false</IsTruncated>" + A + "<?x " + B + "?>"
    + "</ListBucketResult>",
    "a processing instruction holding the root": '<?x <ListBucketResult xmlns="' + NS + '">?><ListBucketResult>'
    + "<IsTruncated>false</IsTruncated>" + A + "</ListBucketResult>",
    "a Contents in an element of no namespace": HEAD + "<IsTruncated>false</IsTruncated>" + A + '<X xmlns="">' + B
    + "</X></ListBucketResult>",
    "a Latin-1 declaration": HEAD.replace("UTF-8", "ISO-8859-1") + "<IsTruncated>false</IsTruncated>"
    + '<Contents><Key>caf\u00e9</Key><ETag>"\u00e9"</ETag><Size>1</Size></Contents></ListBucketResult>',
    "a second document after the root": HEAD + "<IsTruncated>false</IsTruncated>" + A + "</ListBucketResult>"
    + ROOT + "<IsTruncated>false</IsTruncated>" + B
    + "</ListBucketResult>",
    "]]> in a text": HEAD + "<IsTruncated>false</IsTruncated>" + A.replace('"e1"', '"e]]>1"') + "</ListBucketResult>",
    "a control character": HEAD + "<IsTruncated>false</IsTruncated>" + A.replace("cvmfs%2Fa", "cvmfs\x01a")
    + "</ListBucketResult>",
    "an undefined entity": HEAD + "<IsTruncated>false</IsTruncated><Name>&foo;</Name>" + A + "</ListBucketResult>",
    "an Owner in a Contents": HEAD + "<IsTruncated>false</IsTruncated>"
    + A.replace("</Contents>", "<Owner><ID>u</ID><Key>z</Key></Owner></Contents>") + "</ListBucketResult>",
    "a NEL in an XML 1.1 page": HEAD.replace("1.0", "1.1") + "<IsTruncated>true</IsTruncated>" + A
    + "<NextContinuationToken>t\u0085u</NextContinuationToken></ListBucketResult>",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_page_that_hides_or_moves_elements_is_never_read_differently(case):
    body = HOSTILE[case].encode("utf-8")
    assert read_as_elementtree_does(body) is None, "%s: must be left to ElementTree" % case


FRAGMENTS = ["<X>", "</X>", "<Key>z</Key>", '<ETag>"q"</ETag>', "<Size>9</Size>", "<IsTruncated>true</IsTruncated>",
             "<NextContinuationToken>n</NextContinuationToken>", "<Contents>", "</Contents>", "<!-- c -->", "<?p x?>",
             '<s:Key xmlns:s="%s">w</s:Key>' % NS, '<X xmlns="">', "&amp;", "&#34;", " ", "\n", "<Owner><ID>i</ID>"
             "</Owner>", "<LastModified>t</LastModified>", "<StorageClass>S</StorageClass>", "<Type>Normal</Type>",
             "<CommonPrefixes><Prefix>p%2F</Prefix></CommonPrefixes>", A, "</ListBucketResult>", "]]>", "\x01"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ENTRIES, st.booleans(), st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(FRAGMENTS)), min_size=1,
                                        max_size=3))
def test_a_page_with_fragments_slipped_in_is_read_as_elementtree_reads_it_or_not_at_all(entries, truncated, inserts):
    text = page_xml(entries, truncated, "cvmfs/t").decode("utf-8")
    for position, fragment in inserts:   # at a tag boundary, where markup can go
        boundaries = [index for index, char in enumerate(text) if char == "<"]
        at = boundaries[position % len(boundaries)]
        text = text[:at] + fragment + text[at:]
    read_as_elementtree_does(text.encode("utf-8"))


@pytest.mark.parametrize("declaration", ['', '<?xml version="1.0" encoding="UTF-8"?>', "<?xml version='1.0'?>\n",
                                         '<?xml version="1.0" encoding="utf-8" standalone="yes"?>'])
def test_the_declarations_rgw_and_s3_write_take_the_fast_path(declaration):
    body = (declaration + ROOT + "<IsTruncated>true</IsTruncated>"
            + A + B + "<NextContinuationToken>cvmfs/b</NextContinuationToken></ListBucketResult>").encode()
    assert read_as_elementtree_does(body) is not None


def test_a_cut_off_page_is_malformed_not_short():
    body = page_xml([("cvmfs/a", "e1", 1), ("cvmfs/b", "e2", 2)], False, None)
    cut = body[:body.index(b"</Contents>") + len(b"</Contents>")]
    assert listing._read_plain(cut.decode()) is None
    with pytest.raises(ElementTree.ParseError):
        listing.read_page(cut)


@given(XML_TEXT)
def test_decode_key_is_unquote_plus(text):
    from urllib.parse import quote, unquote_plus
    for encoded in (quote_plus(text, safe=""), quote(text, safe="/"), quote(text, safe="").lower(), text):
        assert listing.decode_key(encoded) == unquote_plus(encoded)
