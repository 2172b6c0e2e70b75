"""DICOM TLS: the server's and the client's TLS contexts (PS3.15 B.9, the BCP 195 TLS Secure Transport Connection
Profile).

TLS 1.2 and later only; for TLS 1.2 the cipher suites of BCP 195 (RFC 7525 4.2: ECDHE or DHE key exchange,
AES-GCM), which is what DCMTK's ``--profile-bcp195`` / ``--profile-bcp195-nd`` and Orthanc offer; TLS 1.3's own
suites are all AEAD and stay enabled. No compression, no renegotiation, a fresh ECDHE key per handshake. With
``tls_ca`` set, a client certificate is required and verified against those CA certificates (PS3.15 B.9: the
node authenticates its peers); without it, clients are not asked for one.

Bastion's own associations with a ``tls://`` remote (:class:`~bastion.model.remotes.RemoteAE`) use the client context
(:func:`client_context`): the same protocol floor and suites; the remote's certificate must chain to ``tls_ca``
(the system's CAs where it is not set) and name the host it is reached by (its subjectAltName); this node's
``tls_cert`` and ``tls_key``, where set, are shown as its client certificate (DICOM TLS peers usually require one,
DCMTK's ``storescp +tls`` by default), so that certificate needs the clientAuth extended key usage as well as
serverAuth.
"""

from __future__ import annotations

import functools
import ssl

from bastion.errors import BastionError
from bastion.settings import Settings

#: The TLS 1.2 cipher suites of BCP 195 (RFC 7525 4.2), in OpenSSL's names, strongest first; ECDSA as well as
#: RSA server keys.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256",
))


class TLSConfigError(BastionError):
    """The TLS certificate, key or CA file cannot be used."""


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the DICOM TLS listener (``tls_cert``, ``tls_key``, ``tls_ca``); TLSConfigError says
    which file cannot be used and why."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_ECDH_USE | ssl.OP_SINGLE_DH_USE
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use tls_cert {settings.tls_cert} with tls_key {settings.tls_key}: "
                             f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from exc
    if settings.tls_ca:
        try:
            ctx.load_verify_locations(cafile=settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot use tls_ca {settings.tls_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of Bastion's own associations with ``tls://`` remotes (see the module docstring), made once
    per certificate, key and CA file; TLSConfigError says which file cannot be used and why."""
    return _client_context(settings.tls_cert, settings.tls_key, settings.tls_ca)


@functools.lru_cache(maxsize=4)
def _client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer's certificate and its host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if cert and key:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot use tls_cert {cert} with tls_key {key}: "
                                 f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from exc
    try:
        if ca:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use tls_ca {ca}: {exc}") from exc
    return ctx


def describe(exc: BaseException) -> str:
    """A TLS handshake failure in one line: OpenSSL's reason (``TLSV1_ALERT_PROTOCOL_VERSION``,
    ``PEER_DID_NOT_RETURN_A_CERTIFICATE``, ``CERTIFICATE_VERIFY_FAILED`` ...), or the error's text."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        verify = getattr(exc, "verify_message", None)
        return f"{exc.reason}{f' ({verify})' if verify else ''}"
    return str(exc) or type(exc).__name__
