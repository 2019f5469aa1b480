"""Whom the Deepgram voices trust (callspeak.tts.tls): one answer for REST and WebSocket."""

from __future__ import annotations

from pathlib import Path

import certifi
import pytest

from callspeak.tts.tls import client_tls_context


def authorities(context: object) -> int:
    return int(context.cert_store_stats()["x509_ca"])  # type: ignore[attr-defined]


def test_a_ca_file_or_directory_named_in_the_environment_is_trusted_else_certifis_bundle(
    self_signed: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, _ = self_signed
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    bundle = Path(certifi.where()).read_text().count("BEGIN CERTIFICATE")
    assert authorities(client_tls_context()) == bundle  # certifi's, not the system's
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert authorities(client_tls_context()) == 1  # only the private CA
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))  # (a directory is read as it is asked)
    assert authorities(client_tls_context()) == 0
