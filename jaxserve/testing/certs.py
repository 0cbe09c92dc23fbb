"""Test (and development) certificates made with the `cryptography` package: a CA and, per process, a key and
a certificate usable as both TLS server and client identity (mTLS), with SANs for the hosts it is reached at.

    python -m jaxserve.testing.certs DIR scheduler instance-0 --hosts 127.0.0.1,localhost

writes DIR/ca.pem (and ca-key.pem) plus DIR/NAME.pem / DIR/NAME-key.pem for each NAME. Real deployments
should use their own PKI; these certificates live one day by default."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class CertPair:
    cert_file: str
    key_file: str


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class CertificateAuthority:
    """A throwaway CA that writes its certificate to `folder/ca.pem` and issues process certificates."""

    def __init__(self, folder: str | Path, days: int = 1, name: str = "jaxserve test CA"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.days = days
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=days))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = str(self.folder / "ca.pem")
        Path(self.ca_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        (self.folder / "ca-key.pem").write_bytes(_key_pem(self.key))

    def issue(self, name: str, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> CertPair:
        """A key and certificate for `name` (server and client use), valid for `hosts`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=self.days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_san(hosts), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        pair = CertPair(str(self.folder / f"{name}.pem"), str(self.folder / f"{name}-key.pem"))
        Path(pair.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(pair.key_file).write_bytes(_key_pem(key))
        Path(pair.key_file).chmod(0o600)
        return pair


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("names", nargs="+", help="one certificate per name (a process or a host)")
    parser.add_argument("--hosts", default="127.0.0.1,localhost", help="comma-separated SANs of every certificate")
    parser.add_argument("--days", type=int, default=1)
    args = parser.parse_args(argv)
    ca = CertificateAuthority(args.folder, days=args.days)
    for name in args.names:
        pair = ca.issue(name, args.hosts.split(","))
        print(f"{name}: --tls_cert_file={pair.cert_file} --tls_key_file={pair.key_file} --tls_ca_file={ca.ca_file}")


if __name__ == "__main__":
    main()
