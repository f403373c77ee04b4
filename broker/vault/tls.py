"""What the broker trusts when it talks to Vault over TLS: ``[vault].ca_cert``, else the system's store."""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.errors import ConfigError

__all__ = ["vault_tls_context"]


def vault_tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """The TLS context for Vault's https addresses: certificate and host name checked, TLS 1.2 or later.

    With ``ca_cert`` only the CA certificates in that PEM file are trusted (as ``VAULT_CACERT`` does for
    the vault CLI): not the system's, and nothing from the environment. Without it, OpenSSL's default
    trust store (which ``SSL_CERT_FILE``/``SSL_CERT_DIR`` may replace, as for any OpenSSL program). Read
    once, at start-up, so a missing or broken file stops the broker there rather than failing every request.

    Raises:
        ConfigError: ``ca_cert`` cannot be read or holds no CA certificate (the message names the file,
            never its contents).
    """
    if ca_cert is None:
        context = ssl.create_default_context()
    else:
        try:
            context = ssl.create_default_context(cafile=str(ca_cert))
        except ssl.SSLError as exc:  # before OSError: ssl.SSLError is one
            raise ConfigError(f"vault.ca_cert {ca_cert}: not a PEM certificate file") from exc
        except OSError as exc:
            raise ConfigError(f"vault.ca_cert {ca_cert}: {exc.strerror or type(exc).__name__}") from exc
        if not context.get_ca_certs():
            raise ConfigError(f"vault.ca_cert {ca_cert}: holds no CA certificate")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
