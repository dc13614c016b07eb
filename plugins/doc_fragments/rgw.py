# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Connection options of every module that talks to Ceph RGW (its S3 and SNS APIs, requests signed as botocore signs
them)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options:
  endpoint_url:
    description:
      - URL of the Ceph RGW S3/SNS endpoint, for example V(https://rgw.example.org) or V(http://127.0.0.1:18000).
      - Credentials in O(infn_cloud.cvmfs_publisher.rgw_topic#module:push_endpoint) are only accepted by RGW over
        HTTPS.
    type: str
    required: true
    aliases: [rgw_endpoint]
  access_key:
    description:
      - S3 access key of the RGW user.
      - Mutually exclusive with O(access_key_file). When neither is set, botocore's usual credential chain is used
        (E(AWS_ACCESS_KEY_ID), C(~/.aws/credentials), ...).
    type: str
  access_key_file:
    description:
      - Path of a file holding the access key (trailing newline ignored).
    type: path
  secret_key:
    description:
      - S3 secret key of the RGW user. Never logged.
      - Mutually exclusive with O(secret_key_file); prefer the file.
    type: str
  secret_key_file:
    description:
      - Path of a file holding the secret key (trailing newline ignored).
    type: path
  session_token:
    description:
      - Session token for temporary credentials. Never logged.
    type: str
  region:
    description:
      - Region name used to sign requests; for RGW, the zonegroup name (also the region field of topic ARNs).
    type: str
    default: default
  ca_bundle:
    description:
      - Path of a PEM bundle of the CAs that sign RGW's certificate.
    type: path
  validate_certs:
    description:
      - Whether to verify RGW's TLS certificate. Only turn off for tests.
    type: bool
    default: true
  assume_role_arn:
    description:
      - When set, the static credentials are only used to call STS AssumeRole on RGW for this role, and every
        request uses the role's temporary credentials.
    type: str
  role_session_name:
    description:
      - Session name given to STS AssumeRole with O(assume_role_arn).
    type: str
    default: cvmfs-publisher
requirements:
  - botocore >= 1.36 (on the managed host; boto3 >= 1.36 installs it)
notes:
  - Connection options can be set once for all modules with C(module_defaults) and the action group
    C(group/infn_cloud.cvmfs_publisher.rgw).
  - Requests are signed with SigV4 as botocore signs them and sent by the collection; through a proxy
    (C(HTTPS_PROXY), C(HTTP_PROXY)) they go through botocore's HTTP stack.
  - Requests are tried up to 5 times, with a jittered exponential backoff, on throttling, 5xx answers and
    connection errors. STS AssumeRole uses botocore's STS client and its standard retries.
"""
