"""S3 steps of the molecule scenario against the local stack's RGW (the user's side: bucket, upload, cleanup).

    s3.py create-bucket NAME | put NAME KEY TEXT | delete-bucket NAME

Reads the endpoint and the key files from `devstack/stack env --json` ($DEVSTACK_DIR picks the stack).
"""
import json
import os
import subprocess
import sys

import boto3
from botocore.exceptions import ClientError

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def client():
    stack = json.loads(subprocess.check_output([os.path.join(PROJECT_DIR, "devstack", "stack"), "env", "--json"]))

    def read(path):
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()

    return boto3.client("s3", endpoint_url=stack["RGW_ENDPOINT"], region_name=stack["RGW_REGION"],
                        aws_access_key_id=read(stack["RGW_ACCESS_KEY_FILE"]),
                        aws_secret_access_key=read(stack["RGW_SECRET_KEY_FILE"]))


def create_bucket(s3, name):
    # RGW answers CreateBucket on a bucket the user already owns with success, so look first.
    try:
        s3.head_bucket(Bucket=name)
        print("exists")
        return
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise
    s3.create_bucket(Bucket=name)
    print("created")


def put(s3, name, key, text):
    s3.put_object(Bucket=name, Key=key, Body=text.encode())


def delete_bucket(s3, name):
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=name, Key=item["Key"])
        s3.delete_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucket":
            raise


COMMANDS = {"create-bucket": create_bucket, "put": put, "delete-bucket": delete_bucket}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](client(), *sys.argv[2:])
