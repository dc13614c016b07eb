# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Ceph RGW through boto3, one file per concern (the way amazon.aws splits ``_s3/``).

FOR INTERNAL COLLECTION USE ONLY. These files may change without notice.

- ``client``: options, connection (AssumeRole), error classification, retries, the one signed-request helper;
- ``topic``: RGW topics (SNS API) and the ``rgw_topic`` module's ensure logic;
- ``notification``: bucket notifications (S3 API) and the ``rgw_bucket_notification`` module's ensure logic;
- ``objects``: listing, HeadObject and streamed download of a bucket's objects, for the sync engine.
"""
