"""TLS on modalign's listeners, gRPC and HTTP alike: certificates from files, re-read when they change."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from modalign.core.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """TLS on a service's listeners: its certificate, and optionally the CA its clients' certificates
    must chain to (mutual TLS). The files are re-read when they change, for every new connection, so a
    renewed certificate is served without a restart and without dropping open connections."""

    cert: Path | None = None
    """PEM certificate chain the service presents; with key. Unset: plaintext."""
    key: Path | None = None
    """PEM private key of cert."""
    client_ca: Path | None = None
    """PEM CA certificates a client's certificate must chain to; set, every client must present one."""

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert", "give both --tls.cert and --tls.key, or neither")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError("client_ca", "mutual TLS needs the server's own --tls.cert and --tls.key")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(name, f"no such file: {path}")

    def files(self) -> list[Path]:
        return [Path(p) for p in (self.cert, self.key, self.client_ca) if p is not None]

    def stamp(self) -> tuple:
        """Changes whenever one of the files does."""
        return tuple((info.st_mtime_ns, info.st_size) for info in map(os.stat, self.files()))


@dataclass(frozen=True)
class ClientTls:
    """How a modalign service or tool reaches another over TLS."""

    ca: Path | None = None
    """PEM CA certificates the server's certificate must chain to; unset: plaintext."""
    cert: Path | None = None
    """PEM client certificate, for a server that asks for one (mutual TLS); with key."""
    key: Path | None = None
    """PEM private key of cert."""

    def validate(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert", "give both a client certificate and its key, or neither")
        if self.cert is not None and self.ca is None:
            raise ConfigError("ca", "a client certificate is only sent over TLS: give the server's CA too")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC channel credentials, or None for plaintext."""
        if self.ca is None:
            return None
        read = lambda path: Path(path).read_bytes() if path is not None else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials that present tls's certificate, re-reading its files when any of them changes."""

    def configuration() -> grpc.ServerCertificateConfiguration:
        pair = [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())]  # type: ignore[arg-type]
        roots = Path(tls.client_ca).read_bytes() if tls.client_ca else None
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=roots)

    stamp = tls.stamp()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal stamp
        try:
            now = tls.stamp()
            if now == stamp:
                return None
            renewed = configuration()
        except (OSError, ValueError) as error:  # mid-replacement: keep serving the old one, try next time
            log.warning("TLS files not reloaded yet: %s", error)
            return None
        stamp = now
        log.info("TLS certificate reloaded from %s", tls.cert)
        return renewed

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_authentication=tls.client_ca is not None)


def http_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server SSLContext for an HTTP listener that serves tls's certificate (and asks for a client
    certificate chained to client_ca, when set), switching every new connection to a fresh context
    once the files change: the TLS handshake's server-name callback runs for every connection, with or
    without SNI, before the certificate is sent."""

    def build() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)  # type: ignore[arg-type]
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = switch
        return context

    stamp, renewed = tls.stamp(), None

    def switch(connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext) -> None:
        nonlocal stamp, renewed
        try:
            now = tls.stamp()
            if now != stamp:
                renewed, stamp = build(), now
                log.info("TLS certificate reloaded from %s", tls.cert)
        except (OSError, ssl.SSLError) as error:
            log.warning("TLS files not reloaded yet: %s", error)
        if renewed is not None:
            connection.context = renewed

    return build()
