"""Test certificates in QEMU's directory layout, made with ``openssl``.

``make_tls_dir(path)`` writes ``ca-cert.pem`` (+ ``ca-key.pem``),
``server-cert.pem``/``server-key.pem`` and ``client-cert.pem``/``client-key.pem``
into ``path``: one directory that replfs (``--tls-dir``), qemu-nbd/qemu-img
(``tls-creds-x509,dir=``) and nbdinfo (``tls-certificates=``) all read.
``make_tls_dir(path, ca_from=other)`` signs with ``other``'s CA instead of a
new one (same CA, different leaves); ``client=False`` leaves the client pair
out.  The server certificate names ``localhost``, ``127.0.0.1`` and ``::1``
(QEMU and libnbd check the host name they connected to).  GnuTLS (QEMU,
libnbd) is strict about extensions, so every certificate carries
basicConstraints, keyUsage and extendedKeyUsage as QEMU's documentation
shows them.  EC P-256 keys: quick to make.

Plain functions, no pytest: a session fixture calls them once
(``tmp_path_factory``), and scripts can too.
"""

from __future__ import annotations

import os
import shutil
import subprocess

DAYS = "30"

_CA_EXT = """basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_SERVER_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {san}
"""
_CLIENT_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(*argv: str) -> None:
    r = subprocess.run(["openssl", *argv], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(argv)} failed: {r.stderr.strip()}")


def _key(path: str) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    os.chmod(path, 0o600)


def _leaf(d: str, ca_dir: str, name: str, cn: str, ext: str) -> None:
    key, csr, cert = (os.path.join(d, f"{name}-{s}") for s in ("key.pem", "req.pem", "cert.pem"))
    extfile = os.path.join(d, f"{name}.ext")
    with open(extfile, "w") as f:
        f.write(ext)
    _key(key)
    _run("req", "-new", "-key", key, "-subj", f"/O=replfs test/CN={cn}", "-out", csr)
    _run("x509", "-req", "-in", csr, "-CA", os.path.join(ca_dir, "ca-cert.pem"),
         "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial",
         "-CAserial", os.path.join(d, f"{name}.srl"),
         "-days", DAYS, "-sha256", "-extfile", extfile, "-out", cert)
    for leftover in (csr, extfile, os.path.join(d, f"{name}.srl")):
        if os.path.exists(leftover):
            os.unlink(leftover)


def make_tls_dir(path, *, ca_from=None, server_cn: str = "localhost", client_cn: str = "replfs-primary",
                 client: bool = True, server: bool = True,
                 san: str = "DNS:localhost, IP:127.0.0.1, IP:::1") -> str:
    """Write a CA (or copy ``ca_from``'s) and the leaves into ``path``;
    returns ``path`` as a string."""
    d = str(path)
    os.makedirs(d, exist_ok=True)
    if ca_from is None:
        ext = os.path.join(d, "ca.ext")
        with open(ext, "w") as f:
            f.write(_CA_EXT)
        _key(os.path.join(d, "ca-key.pem"))
        _run("req", "-new", "-x509", "-key", os.path.join(d, "ca-key.pem"), "-sha256",
             "-days", DAYS, "-subj", "/O=replfs test/CN=replfs test CA",
             "-extensions", "v3_ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", os.path.join(d, "ca-cert.pem"))
        os.unlink(ext)
    else:
        for name in ("ca-cert.pem", "ca-key.pem"):
            shutil.copy(os.path.join(str(ca_from), name), os.path.join(d, name))
    if server:
        _leaf(d, d, "server", server_cn, _SERVER_EXT.format(san=san))
    if client:
        _leaf(d, d, "client", client_cn, _CLIENT_EXT)
    return d
