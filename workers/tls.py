"""Mutual TLS on the internal worker channels: certificate files, and the credentials both ends
build from them.

Every worker server asks for a client certificate signed by the cluster's CA and refuses a caller
without one; every scheduler presents its certificate and checks the worker's against the same
CA. Workers are reached by IP address, so the worker certificate is checked against a fixed name
(`server_name`, default "specdec-worker", in the certificate's subjectAltName) rather than the
address: one certificate can serve every worker node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

SERVER_NAME = "specdec-worker"


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca_file: str  # the CA that signs every worker's and every scheduler's certificate
    cert_file: str  # this process's certificate chain (PEM)
    key_file: str  # its private key (PEM)
    server_name: str = SERVER_NAME  # the name worker certificates carry

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return (
            Path(self.ca_file).read_bytes(),
            Path(self.cert_file).read_bytes(),
            Path(self.key_file).read_bytes(),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)]
