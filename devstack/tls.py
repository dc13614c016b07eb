"""TLS for the local stack (`devstack/stack up --tls`): a throw-away CA and what each server needs to use it.

`up --tls` makes, in $DEVSTACK_DIR/tls/, a CA (`ca.pem`, key `ca.key`) and one server certificate for `localhost`
and `127.0.0.1` signed by it (`server.pem`, `server.key`). Every service then listens with TLS only, on its usual
port: RGW (beast's ssl_endpoint, see ``rgw_frontend``), RabbitMQ (AMQPS and the management API over https) and
OpenBao (a config-file server, since the dev server has no TLS of its own).
RGW pushes events to `amqps://localhost:<port>` with `verify-ssl` on and the CA as the topic's `ca-location`:
librabbitmq checks the broker's name against the certificate's DNS names, hence `localhost` there.

The tests reuse ``make_ca`` and ``make_server_cert`` for a CA nobody trusts and a certificate for another name.
Standard library plus the `openssl` command line.
"""

import os
import shutil
import ssl
import subprocess
import tempfile

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)
DAYS = 30


class TlsError(Exception):
    """openssl is missing or failed: the message says which step."""


def _openssl(args, what):
    if not shutil.which("openssl"):
        raise TlsError("the openssl command is needed for --tls (Debian package openssl)")
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise TlsError("%s failed: openssl %s: %s" % (what, args[0], (result.stderr or result.stdout).strip()[-1000:]))


def _private(path):
    os.chmod(path, 0o600)
    return path


def make_ca(directory, common_name="cvmfs-publisher devstack CA"):
    """A self-signed CA in ``directory``: returns (certificate path, key path)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert, key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    _openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", str(DAYS),
              "-subj", "/CN=" + common_name,
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], "making the CA")
    return cert, _private(key)


def make_server_cert(directory, ca_cert, ca_key, names=SERVER_NAMES, ips=SERVER_IPS, prefix="server"):
    """A server certificate for ``names`` (DNS) and ``ips`` signed by the CA: returns (certificate, key) paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert = os.path.join(directory, prefix + ".pem")
    key = os.path.join(directory, prefix + ".key")
    alt_names = ["DNS:" + name for name in names] + ["IP:" + ip for ip in ips]
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        csr = os.path.join(tmp, "req.csr")
        extensions = os.path.join(tmp, "ext.cnf")
        with open(extensions, "w") as handle:
            handle.write("basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
                         "extendedKeyUsage = serverAuth\nsubjectAltName = %s\n" % ",".join(alt_names))
        _openssl(["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                  "-subj", "/CN=" + (list(names) + list(ips))[0]], "making the server key")
        _openssl(["x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                  "-CAserial", os.path.join(tmp, "ca.srl"), "-out", cert, "-days", str(DAYS),
                  "-extfile", extensions], "signing the server certificate")
    return cert, _private(key)


class StackPki:
    """The paths of one stack's CA and server certificate (they exist once ``create`` ran)."""

    def __init__(self, directory):
        self.dir = directory
        self.ca_cert = os.path.join(directory, "ca.pem")
        self.ca_key = os.path.join(directory, "ca.key")
        self.server_cert = os.path.join(directory, "server.pem")
        self.server_key = os.path.join(directory, "server.key")

    def create(self):
        make_ca(self.dir)
        make_server_cert(self.dir, self.ca_cert, self.ca_key)
        return self

    def client_context(self):
        """An SSLContext trusting only this CA, checking host names (for the stack's own API calls)."""
        return ssl.create_default_context(cafile=self.ca_cert)


# --------------------------------------------------------------------------------------------------------------------
# Server configuration


def rgw_frontend(port, pki):
    """RGW's `rgw frontends` value with TLS only. Not civetweb: Debian's 16.2 civetweb loads libssl at run time and
    fails on OpenSSL 3 (`load_dll: libssl.so.3: cannot find SSL_get_peer_certificate`), so radosgw exits. beast
    links OpenSSL itself; its DeleteObjects crash with notifications (RGW notes, gotcha 12) applies in TLS mode.
    tcp_nodelay=1 as for civetweb (stacklib.py's ceph.conf says why)."""
    return "beast ssl_endpoint=127.0.0.1:%d ssl_certificate=%s ssl_private_key=%s tcp_nodelay=1" % (
        port, pki.server_cert, pki.server_key)


def rabbitmq_conf(amqp_port, management_port, pki):
    """rabbitmq.conf lines: AMQPS and the management API over https, no plain listener."""
    return """\
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:{amqp}
ssl_options.cacertfile = {ca}
ssl_options.certfile = {cert}
ssl_options.keyfile = {key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
management.ssl.ip = 127.0.0.1
management.ssl.port = {mgmt}
management.ssl.cacertfile = {ca}
management.ssl.certfile = {cert}
management.ssl.keyfile = {key}
""".format(amqp=amqp_port, mgmt=management_port, ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key)


def openbao_config(api_port, cluster_port, pki):
    """An OpenBao server (in-memory storage, TLS listener) that `up` initialises and unseals itself."""
    return """\
storage "inmem" {{}}
listener "tcp" {{
  address = "127.0.0.1:{api}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
api_addr = "https://127.0.0.1:{api}"
cluster_addr = "https://127.0.0.1:{cluster}"
disable_mlock = true
ui = false
""".format(api=api_port, cluster=cluster_port, cert=pki.server_cert, key=pki.server_key)
