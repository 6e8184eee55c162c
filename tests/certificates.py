"""Certificates for tests of TLS and mutual TLS: a CA, and the server and client certificates it signs."""

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
    serial: int


class CertificateAuthority:
    """A CA of its own in folder (ca.pem), issuing certificates valid for a day."""

    def __init__(self, folder: Path, name: str = "modalign test CA") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            self._builder(self._name, self._name, self._key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self.folder / "ca.pem"
        self.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def server(self, name: str = "server") -> Issued:
        """A certificate for 127.0.0.1 and localhost, as name.pem and name.key."""
        return self._issue(name, "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        ])

    def client(self, common_name: str) -> Issued:
        """A client certificate whose common name is common_name (the principal a server sees)."""
        return self._issue(f"client-{common_name}", common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def _issue(self, file_name: str, common_name: str, usage: x509.ObjectIdentifier,
               alternative_names: list[x509.GeneralName]) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            self._builder(name, self._name, key.public_key(), datetime.datetime.now(datetime.UTC))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alternative_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{file_name}.pem", self.folder / f"{file_name}.key"
        # Written aside and renamed, as a certificate manager does: a reader never sees half a file.
        for path, data in ((key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption())),
                           (cert_path, certificate.public_bytes(serialization.Encoding.PEM))):
            path.with_suffix(".tmp").write_bytes(data)
            path.with_suffix(".tmp").replace(path)
        return Issued(cert_path, key_path, certificate.serial_number)

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )
