"""Who may do what on the local stack: the RabbitMQ identities and their permissions, the RGW users (tenants) and
the bucket policies that let them reach their own bucket only.

Each identity gets only what its job needs (docs/operator-guide.md, "Rights", is the same table for a site):

- ``devstack-admin``: the broker's administrator (rabbitmq.conf ``default_user``, so no ``guest`` administrator
  is ever created). Only the stack itself and the tests' look-ups behind the scenes use it.
- ``guest``: RGW 16.2's identity. RGW refuses credentials in a push endpoint sent over plain HTTP and then logs in
  with librabbitmq's default guest/guest, so the name and password stay; what guest may do shrinks to publishing
  on the notification exchange (its passive declare of that exchange needs no permission) and the exclusive,
  server-named reply queue RGW declares and consumes on each of its connections (amq.gen-*).
- ``cvmfs-dashboard``: announces repositories; may only publish on the provisioning exchange.
- ``cvmfs-publisher``: the daemon; configures and consumes the queues of the vhost (per-repository queues, the
  provisioning queue, the dead-letter queue, the registry stream), publishes through the default exchange (retry
  copies, dead letters, registry entries) and binds its provisioning queue to the provisioning exchange. It may not
  touch the notification exchange (it cannot forge an RGW event) nor publish a provisioning request. The
  ``management`` tag lets it read the consumer list of its vhost (spreading repositories over hosts).
- ``cvmfs-publisher-api``: the management-API user of the ``amqp_queue`` module: declares, binds and deletes the
  per-repository queues (and their dead-letter exchanges and queues); may read (bind from) the notification
  exchange; cannot consume or publish anything, nor touch the daemon's own queues.

RabbitMQ's three regular expressions match exchange and queue names alike (one name space per vhost); configure =
declare/delete, write = publish to an exchange / bind to a queue, read = consume a queue / bind from an exchange.
"""

NOTIFICATION_EXCHANGE = "notification"
PROVISIONING_EXCHANGE = "cvmfs-publisher.provisioning"
ADMIN_USER = "devstack-admin"
RGW_USER = "guest"
RGW_PASSWORD = "guest"  # librabbitmq's default: RGW 16.2 logs in with it (see above)
DASHBOARD_USER = "cvmfs-dashboard"
DAEMON_USER = "cvmfs-publisher"
API_USER = "cvmfs-publisher-api"

NOTHING = "^$"
# Names the daemon and the module must never configure: the two exchanges that carry requests into the publisher,
# the broker's own amq.* exchanges, and for the module the daemon's queues (cvmfs-publisher.*, publisher).
_NOT_EXCHANGES = r"(?!(notification|cvmfs-publisher\.provisioning)$|amq\.)"


class Identity:
    def __init__(self, user, tags, configure, write, read, secret, job):
        self.user = user
        self.tags = tags
        self.configure = configure
        self.write = write
        self.read = read
        self.secret = secret  # file name under secrets/ holding the password
        self.job = job

    @property
    def permissions(self):
        return {"configure": self.configure, "write": self.write, "read": self.read}


RABBITMQ_IDENTITIES = (
    # RGW 16.2 declares an exclusive, server-named reply queue (amq.gen-...) on each connection and consumes it.
    Identity(RGW_USER, "", r"^amq\.gen-.*$", r"^notification$", r"^amq\.gen-.*$", "amqp_rgw_password",
             "RGW: publishes bucket events on the notification exchange"),
    Identity(DASHBOARD_USER, "", NOTHING, r"^cvmfs-publisher\.provisioning$", NOTHING, "amqp_dashboard_password",
             "dashboard: publishes provisioning requests on the provisioning exchange"),
    Identity(DAEMON_USER, "management",
             r"^(?!notification$|amq\.).+$",
             r"^(?!notification$|cvmfs-publisher\.provisioning$).*$",
             r"^(?!notification$).*$", "amqp_password",
             "daemon: its queues (declare, consume), the default exchange (retry copies, dead letters, registry)"),
    Identity(API_USER, "management",
             r"^%s(?!cvmfs-publisher\.|publisher$).+$" % _NOT_EXCHANGES,
             r"^%s(?!cvmfs-publisher\.|publisher$).+$" % _NOT_EXCHANGES,
             # Read on the queue too: RabbitMQ asks it of whoever declares a queue with a dead-letter exchange.
             r"^(notification|%s(?!cvmfs-publisher\.|publisher$).+)$" % _NOT_EXCHANGES, "rabbitmq_api_password",
             "amqp_queue module: declares, binds and deletes per-repository queues through the management API"),
)


def identity(user):
    for candidate in RABBITMQ_IDENTITIES:
        if candidate.user == user:
            return candidate
    raise KeyError(user)


# -- Ceph RGW ---------------------------------------------------------------------------------------------------------
# RGW 16.2 lets only a bucket's owner set or read its notification (docs/operator-guide.md, "Rights"), so the
# publisher owns the repositories' buckets and each user gets a policy on their own bucket. The users live in the
# publisher's RGW tenant, where topics are open to every user: RGW 16.2 looks a bucket's notifications up in the
# *uploader's* tenant (rgw_notify.cc, publish_reserve), so the upload of a user of another tenant reaches the
# bucket (named ":<bucket>") but raises no event (tests/integration/test_tenants.py proves both on the stack).
RGW_PUBLISHER_USER = "devstack"
RGW_TENANT_USERS = ("alice", "bob")
CONTENT_PREFIX = "cvmfs/"
REPORT_PREFIX = ".cvmfs-publisher/"


def principal(user, tenant=""):
    """A user's ARN in a bucket policy: RGW spells the tenant in the account field, empty for the default tenant."""
    return "arn:aws:iam::%s:user/%s" % (tenant, user)


def _statement(principal_arn, actions, resource):
    return {"Effect": "Allow", "Principal": {"AWS": [principal_arn]}, "Action": actions, "Resource": [resource]}


def tenant_bucket_policy(bucket, user, publisher=RGW_PUBLISHER_USER, tenant=""):
    """What the owner (the publisher) grants a user on the user's repository bucket: list it, read, write and
    delete under the content prefix. Nothing on the notification or the policy, nothing elsewhere.

    ``tenant`` is the user's RGW tenant (empty: the publisher's, as on the local stack). An object belongs to
    whoever uploaded it, and its ACL lets only them read it: the policy also grants the publisher, owner of the
    bucket, s3:GetObject on every object (RGW applies a bucket policy's Allow to objects of any owner), so the user
    need not upload with ``bucket-owner-full-control``."""
    user_arn = principal(user, tenant)
    return {"Version": "2012-10-17", "Statement": [
        _statement(user_arn, ["s3:ListBucket"], "arn:aws:s3:::%s" % bucket),
        _statement(principal(publisher), ["s3:GetObject"], "arn:aws:s3:::%s/*" % bucket),
        _statement(user_arn, ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                   "arn:aws:s3:::%s/%s*" % (bucket, CONTENT_PREFIX)),
    ]}


def publisher_bucket_policy(bucket, publisher):
    """What a user who owns a bucket grants the publisher (Ceph after 16.2 honours the notification actions;
    16.2 refuses them to anyone but the owner): read everything, write only its reports, manage notifications."""
    publisher_arn = principal(publisher)
    return {"Version": "2012-10-17", "Statement": [
        _statement(publisher_arn, ["s3:ListBucket", "s3:GetBucketNotification", "s3:PutBucketNotification"],
                   "arn:aws:s3:::%s" % bucket),
        _statement(publisher_arn, ["s3:GetObject"], "arn:aws:s3:::%s/*" % bucket),
        _statement(publisher_arn, ["s3:PutObject"], "arn:aws:s3:::%s/%s*" % (bucket, REPORT_PREFIX)),
    ]}
