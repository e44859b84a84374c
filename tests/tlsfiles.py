"""A throw-away certificate authority for tests: a CA, server and client certificates, made at test time."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A CA whose files live in `base`; every key is new and none outlives the test."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    def __init__(self, base: Path, name: str = "sluicegate test CA") -> None:
        self.base = base
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.cert = base / "ca.pem"
        self.cert.write_bytes(self.cert_pem)

    def _issue(self, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier, stem: str) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert_pem = builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        cert, key_path = self.base / f"{stem}.pem", self.base / f"{stem}.key"
        cert.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        return Issued(cert=cert, key=key_path, cert_pem=cert_pem, key_pem=key_pem)

    def issue_server(self, name: str = "localhost") -> Issued:
        sans: list[x509.GeneralName] = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        return self._issue(name, sans, ExtendedKeyUsageOID.SERVER_AUTH, f"server-{name}")

    def issue_client(self, name: str, *, tenants: list[str], role: str | None = None) -> Issued:
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"urn:sluicegate:tenant:{t}") for t in tenants]
        if role is not None:
            sans.append(x509.UniformResourceIdentifier(f"urn:sluicegate:role:{role}"))
        return self._issue(name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, f"client-{name}")


def make_ca(base: Path, name: str = "sluicegate test CA") -> TestCA:
    base.mkdir(parents=True, exist_ok=True)
    return TestCA(base, name)
