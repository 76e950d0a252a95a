"""TLS to the Consul agent: the context a connection uses, and what a handshake failure means.

Two functions, both driven by :class:`~celery_consul_lock.settings.ConsulSettings` only (never
``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE`` behind the settings' back):

* :func:`tls_context` builds the :class:`ssl.SSLContext` for an ``https`` agent: the CA
  (``ca_file``, else the system's), verification (``verify``), the client certificate
  (``client_cert`` / ``client_key``) for an agent with ``verify_incoming``.
* :func:`tls_failure` turns an :class:`ssl.SSLError` raised during a request into one
  sentence naming the setting that fixes it.
"""

from __future__ import annotations

import ssl

from . import native as _native
from .errors import InvalidSetting
from .settings import ConsulSettings

__all__ = ["tls_context", "tls_failure"]


def tls_context(settings: ConsulSettings, native: bool = False) -> ssl.SSLContext:
    """The TLS context for an ``https`` agent.

    The settings already checked that each file is PEM; one that still does not load
    (corrupt, or a key that is not the certificate's) raises InvalidSetting here, at the
    first connection, instead of an ``ssl`` traceback. ``native``: of the unpatched
    SSLContext class, whose sockets are real under gevent (see :mod:`.native`).
    """
    try:
        if native and _native.green():
            context = _native.ssl_context_class()(ssl.PROTOCOL_TLS_CLIENT)
            if settings.ca_file:
                context.load_verify_locations(cafile=settings.ca_file)
            else:
                context.load_default_certs()
        else:
            context = ssl.create_default_context(cafile=settings.ca_file)
    except ssl.SSLError as exc:
        raise InvalidSetting("ca_file", settings.ca_file, f"cannot be loaded as a CA certificate ({exc.reason})") from None
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        try:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        except ssl.SSLError as exc:
            raise InvalidSetting(
                "client_key",
                settings.client_key,
                f"cannot be loaded with client_cert={settings.client_cert!r} ({exc.reason}); "
                "expected the PEM private key of that certificate",
            ) from None
    return context


def tls_failure(exc: ssl.SSLError, settings: ConsulSettings) -> str:
    """What a TLS error means for the user, and which setting fixes it (one sentence)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS verification of the agent's certificate failed ({exc.verify_message}); set consul_lock_ca_file / "
            "CONSUL_CACERT to the CA that signed it"
        )
    reason = str(exc.reason or exc)
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        # The agent refused us during the handshake: it requires a client certificate
        # (verify_incoming) signed by a CA it trusts.
        if settings.client_cert is None:
            return (
                f"the agent requires a client certificate ({reason}); set consul_lock_client_cert and "
                "consul_lock_client_key / CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"
            )
        return (
            f"the agent refused the client certificate {settings.client_cert!r} ({reason}); it must be signed "
            "by a CA in the agent's ca_file"
        )
    return (
        f"TLS failed ({reason}); check that the agent serves HTTPS there, and consul_lock_ca_file / CONSUL_CACERT, "
        "consul_lock_client_cert / CONSUL_CLIENT_CERT"
    )
