"""A throw-away TLS certificate for servers on loopback (tests, benchmarks).

Made with the ``openssl`` command, as ``cryptography`` is not a dependency: an elliptic-curve
(P-256) key, as api.deepgram.com's certificate has, valid one day for ``127.0.0.1`` and
``localhost``. Clients trust it as a private CA would be trusted: ``SSL_CERT_FILE``, or an
``ssl.SSLContext`` loading it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["self_signed_certificate"]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` into ``directory``; returns their paths. Raises
    :class:`FileNotFoundError` without an ``openssl`` command, and
    :class:`subprocess.CalledProcessError` (with its stderr) if it fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("making a certificate needs the openssl command")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return cert, key
