"""Mutual TLS for a run: the run CA, node certificates, and the credentials every channel is built from.

A run's TLS directory holds ``ca.crt`` and ``ca.key`` (the run CA, made by ``lowband-coordinator
init-tls``) and one ``NAME.crt``/``NAME.key`` pair per participant (``lowband-coordinator issue``):
``coordinator`` for the coordinator, ``admin`` for the ``status``/``export`` clients, and each node's
id for that node. A participant gets only the CA certificate and its own pair; ``ca.key`` stays with
whoever issues certificates.

Why certificates name identities, not hosts: nodes come and go at addresses nobody knows when their
certificate is issued. Every certificate's subject CN is its owner's name and its subjectAltName lists
that name plus ``PEER_NAME``; a client checks the coordinator by its name (``COORDINATOR_NAME``, via
gRPC's target-name override) and a peer node by ``PEER_NAME`` (any certificate of the run CA), and a
server checks what its client *claims* (a Join's node id, a hop's sender, a shard's sender) against
the client certificate's CN (``peer_name``). Keys are EC P-256: gRPC's BoringSSL and Python's OpenSSL
both take them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
COORDINATOR_NAME = "coordinator"
ADMIN_NAME = "admin"
PEER_NAME = "lowband-peer"          # in every certificate: what a node checks a peer node's certificate for
CA_DAYS = 3650
CERT_DAYS = 365
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class TlsError(ValueError):
    """A TLS directory, certificate or name that cannot be used; the message says which file and why."""


def check_name(name: str) -> str:
    """A certificate name is a node id: letters, digits, '.', '_', '-' (it is also a DNS name in the SAN)."""
    if not _NAME.match(name) or name in ("ca", PEER_NAME):
        raise TlsError(f"certificate name {name!r}: use 1-63 letters, digits, '.', '_' or '-' "
                       f"(not 'ca' or {PEER_NAME!r})")
    return name


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only (created 0600, never world-readable even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(directory: str | Path, *, run_name: str = "lowband run", days: int = CA_DAYS,
            overwrite: bool = False) -> Path:
    """Make the run CA in ``directory`` (``ca.crt``, ``ca.key`` 0600); refuses to replace one that exists."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists() and not overwrite:
        raise TlsError(f"{directory / CA_KEY} exists: this directory already holds a run CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{run_name} CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(directory / CA_KEY, _key_pem(key))
    (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / CA_CERT


def issue(directory: str | Path, name: str, *, hosts: tuple[str, ...] = (), days: int = CERT_DAYS) -> Path:
    """Issue ``NAME.crt``/``NAME.key`` (0600) in ``directory``, signed by its run CA.

    The certificate serves as client and server; its SAN holds ``name``, ``PEER_NAME``, 127.0.0.1 and
    ``hosts`` (extra DNS names or IP addresses, for tools that check the host itself)."""
    directory = Path(directory)
    check_name(name)
    try:
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except OSError as exc:
        raise TlsError(f"no run CA in {directory} ({exc.strerror}): run `lowband-coordinator init-tls --dir "
                       f"{directory}` first") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{directory / CA_KEY} is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName(PEER_NAME),
                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(directory / f"{name}.key", _key_pem(key))
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / f"{name}.crt"


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """One participant's TLS material: the run CA and its own certificate and key (PEM), by name."""

    name: str
    ca_path: Path
    cert_path: Path
    key_path: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, directory: str | Path, name: str) -> TlsConfig:
        """``DIR/ca.crt`` and ``DIR/NAME.crt``/``.key``, checked now so a bad setup fails at start with the
        file's name: missing, expired or not yet valid, not issued by this CA, or issued to another name."""
        directory = Path(directory)
        check_name(name)
        paths = (directory / CA_CERT, directory / f"{name}.crt", directory / f"{name}.key")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise TlsError(f"TLS directory {directory} lacks {', '.join(missing)} (make them with "
                           f"`lowband-coordinator init-tls --dir {directory}` and `lowband-coordinator issue "
                           f"--dir {directory} --name {name}`)")
        ca_pem, cert_pem, key_pem = (p.read_bytes() for p in paths)
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise TlsError(f"TLS directory {directory}: unreadable certificate or key for {name!r}: {exc}") from exc
        now = _now()
        for path, c in ((paths[0], ca), (paths[1], cert)):
            if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise TlsError(f"{path} is valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                               f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now: issue a new one")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise TlsError(f"{paths[1]} was not issued by the run CA {paths[0]}") from exc
        if key.public_key() != cert.public_key():
            raise TlsError(f"{paths[2]} is not the key of {paths[1]}")
        if _common_name(cert) != name:
            raise TlsError(f"{paths[1]} is issued to {_common_name(cert)!r}, not {name!r}")
        return cls(name, *paths, ca_pem, cert_pem, key_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server side: our certificate, and every client must show one from the run CA."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def server_context(self) -> ssl.SSLContext:
        """The activation wire's server side: TLS 1.3, a client certificate from the run CA required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The activation wire's client side: the server must show a run-CA certificate naming ``PEER_NAME``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        return ctx


def load_tls(directory: str | Path | None, name: str) -> TlsConfig | None:
    """``TlsConfig.load`` when a directory is given; None (plaintext) otherwise."""
    return TlsConfig.load(directory, name) if directory else None


# -- channels and servers ------------------------------------------------------------------

_process_tls: TlsConfig | None = None


def set_process_tls(tls: TlsConfig | None) -> None:
    """The TLS this process's peer channels use where no caller passes one (the averager's channel pool).
    One identity per process: a node process sets its own at start."""
    global _process_tls
    _process_tls = tls


def process_tls() -> TlsConfig | None:
    return _process_tls


class _ProcessDefault:
    pass


PROCESS = _ProcessDefault()   # open_channel's default: the process's TLS (set_process_tls)


def _secure_options(options: list[tuple[str, Any]], server_name: str) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]


def open_channel(address: str, options: list[tuple[str, Any]], tls: TlsConfig | _ProcessDefault | None = PROCESS,
                 *, server_name: str = PEER_NAME) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: mutual TLS checking the server for ``server_name`` when ``tls``
    (or the process's TLS) is set, plaintext otherwise."""
    tls = _process_tls if isinstance(tls, _ProcessDefault) else tls
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=_secure_options(options, server_name))


def open_sync_channel(address: str, options: list[tuple[str, Any]], tls: TlsConfig | None, *,
                      server_name: str = COORDINATOR_NAME) -> grpc.Channel:
    """``open_channel`` for the blocking API (the CLI's status call)."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=_secure_options(options, server_name))


def add_port(server: grpc.aio.Server, bind: str, tls: TlsConfig | None) -> int:
    """Listen on ``bind``, with mutual TLS when ``tls`` is set (plaintext clients then fail the handshake)."""
    if tls is None:
        return server.add_insecure_port(bind)
    return server.add_secure_port(bind, tls.server_credentials())


def peer_name(context: grpc.aio.ServicerContext) -> str | None:
    """The CN of the calling peer's verified certificate; None on a plaintext connection."""
    try:
        auth = context.auth_context()
    except Exception:   # a context without transport security information
        return None
    names = auth.get("x509_common_name") or []
    if not names:
        return None
    name = names[0]
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def check_claimed_id(context: grpc.aio.ServicerContext, claimed: str) -> str:
    """Why a TLS peer may not speak as ``claimed`` (its certificate names another node); '' when it may,
    or when the connection carries no certificate (plaintext run: nothing to check against).

    Called at the entry of RPCs that carry a sender id (Join's node id, ReduceShard's sender, a hop's
    previous node) before anything else happens."""
    name = peer_name(context)
    if name is None or name == claimed:
        return ""
    return f"the caller's certificate names {name!r}, not {claimed!r}"


def wire_peer_name(peercert: dict[str, Any] | None) -> str | None:
    """The CN from ``ssl``'s ``getpeercert()`` dictionary (the activation wire); None without one."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
