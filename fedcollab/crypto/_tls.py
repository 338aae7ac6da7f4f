"""Certificates and node-authentication keys for a deployment (``cryptography`` x509).

``make_trial_certificates`` writes a local CA and a server certificate signed by it, for trials:
organisations in production use their own PKI. The server certificate names every address the
SuperLink is reached at (``DNS:localhost, IP:127.0.0.1`` always: Flower's own SuperExec reaches
the Runtime API on loopback).

``generate_node_auth_key`` writes the P-384 key a SuperNode authenticates with (OpenSSH format,
as ``flower-supernode --auth-supernode-private-key`` reads it) and its public half
(``ecdsa-sha2-nistp384 ...``), which the coordinator registers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcollab.core import CryptoError, write_private


@dataclass(frozen=True)
class TrialCertificates:
    """Paths of the files :func:`make_trial_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sans: tuple[str, ...]


def _write_private(path: Path, data: bytes) -> None:
    try:
        write_private(path, data, mode="new")
    except FileExistsError:
        raise CryptoError(f"{path} exists; refusing to overwrite a private key") from None


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_trial_certificates(out: str | Path, *, hosts: list[str] | tuple[str, ...] = (), days: int = 365) -> TrialCertificates:
    """A CA (``ca.crt``, ``ca.key``) and a server certificate (``server.crt``, ``server.key``) in ``out``.

    Keys are P-384 from the OS CSPRNG, written with mode 0600; existing keys are never overwritten.
    ``hosts`` are extra DNS names or IP addresses for the server certificate's SANs.
    """
    out = Path(out)
    sans = tuple(dict.fromkeys(["localhost", "127.0.0.1", *hosts]))
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcollab trial CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    paths = TrialCertificates(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key", sans)
    _write_private(paths.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    _write_private(paths.server_key, srv_key.private_bytes(pem, pkcs8, none))
    paths.ca_cert.write_bytes(ca.public_bytes(pem))
    paths.server_cert.write_bytes(srv.public_bytes(pem))
    return paths


def certificate_sans(path: str | Path) -> list[str]:
    """The DNS names and IP addresses a certificate names."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*ext.get_values_for_type(x509.DNSName), *(str(a) for a in ext.get_values_for_type(x509.IPAddress))]


def generate_node_auth_key(path: str | Path) -> str:
    """Write a P-384 node-authentication key (OpenSSH, mode 0600) and ``PATH.pub``; returns the public line."""
    p = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(p, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    p.with_name(p.name + ".pub").write_text(pub + "\n")
    return pub


def load_node_auth_public_key(path_or_text: str | Path) -> bytes:
    """An OpenSSH EC public key (file path or the line itself), checked, as PEM (SubjectPublicKeyInfo) for registration."""
    text = str(path_or_text)
    raw = Path(text).read_bytes() if not text.startswith("ecdsa-") and Path(text).exists() else text.encode()
    try:
        key = serialization.load_ssh_public_key(raw.strip())
    except (ValueError, TypeError) as exc:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise CryptoError(f"node key {shown!r}: expected an OpenSSH public key (`ecdsa-sha2-...` line) or a file holding one, "
                          "got neither (no such file, or not that format)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CryptoError(f"a node key must be an EC key on a NIST curve (got {type(key).__name__})")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
