"""TLS for the local fleet's Redis: a private CA and a server certificate for 127.0.0.1 / localhost, made by `up`
with the `cryptography` package when it is installed, else with the `openssl` command. Keys are written 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

DAYS = 825


class TlsError(RuntimeError):
    pass


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certificates(folder: Path) -> Path:
    """ca.pem, server.pem and server.key under `folder` (kept when already there); returns the CA's path."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = folder / "ca.pem"
    if ca.is_file() and (folder / "server.pem").is_file() and (folder / "server.key").is_file():
        return ca
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _with_openssl(folder)
    else:
        _with_cryptography(folder)
    return ca


def _with_cryptography(folder: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warmfleet local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warmfleet local redis")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), private=True)
    _write(folder / "server.pem", cert.public_bytes(pem))
    _write(folder / "ca.pem", ca_cert.public_bytes(pem))  # the CA's key is not kept: nothing else is ever signed


def _with_openssl(folder: Path) -> None:
    exe = shutil.which("openssl")
    if not exe:
        raise TlsError("TLS for the local Redis needs the `cryptography` package or the `openssl` command")
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n")
    steps = [
        [exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
         "ca.key", "-out", "ca.pem", "-days", str(DAYS), "-subj", "/CN=warmfleet local CA"],
        [exe, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
         "-out", "server.csr", "-subj", "/CN=warmfleet local redis"],
        [exe, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
         "server.pem", "-days", str(DAYS), "-extfile", str(ext)],
    ]
    for argv in steps:
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
        if done.returncode:
            raise TlsError(f"openssl could not make the local Redis's certificates: {done.stderr.strip()[-300:]}")
    os.chmod(folder / "server.key", 0o600)
    for name in ("ca.key", "server.csr", "ca.srl", "server.ext"):
        (folder / name).unlink(missing_ok=True)


def tls_url(url: str, ca: Path) -> str:
    """`url` as rediss:// with the certificate verified against `ca`."""
    scheme, rest = url.split("://", 1)
    return f"rediss://{rest}{'&' if '?' in rest else '?'}ssl_cert_reqs=required&ssl_ca_certs={ca}"
