# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Connection options of every module that talks to the RabbitMQ management HTTP API."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options:
  api_url:
    description:
      - URL of the RabbitMQ management HTTP API (the C(rabbitmq_management) plugin), for example
        V(https://rabbitmq.example.org:15671) or V(http://127.0.0.1:15672).
    type: str
    required: true
  login_user:
    description:
      - RabbitMQ user; it needs the C(management) tag and configure/write/read permission on O(vhost).
    type: str
    default: guest
  login_password:
    description:
      - Password of O(login_user). Never logged. Mutually exclusive with O(login_password_file); prefer the file.
    type: str
  login_password_file:
    description:
      - Path of a file holding the password of O(login_user) (trailing newline ignored).
    type: path
  vhost:
    description:
      - Virtual host holding the exchanges and queues.
    type: str
    default: /
  ca_cert:
    description:
      - Path of a PEM bundle of the CAs that sign the management API's certificate.
    type: path
  validate_certs:
    description:
      - Whether to verify the management API's TLS certificate. Only turn off for tests.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for each management API answer.
    type: int
    default: 30
notes:
  - Connection options can be set once for all modules with C(module_defaults) and the action group
    C(group/infn_cloud.cvmfs_publisher.amqp).
"""
