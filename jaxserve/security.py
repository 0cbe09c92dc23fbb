"""Who may call what, and how links are encrypted: the one table of which secret each gRPC method needs
(`ACCESS`), the server interceptor that enforces it, the client side that sends it, TLS/mTLS credentials and
the rule that a process without a secret binds only loopback unless told `--insecure`. No jax.

Two secrets, both sent as `authorization: Bearer <secret>` metadata and compared in constant time:
- the client API key (`--api_key` / $JAXSERVE_API_KEY; the HTTP front's key too) opens the client RPCs;
- the cluster secret (`--cluster_secret` / $JAXSERVE_CLUSTER_SECRET, default: the API key) opens everything:
  instance registration and reports, scheduler -> instance and instance <-> instance calls, and admin RPCs.
Health checks stay open (load balancers and probes carry no secret; the answer reveals nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os

import grpc

OPEN, CLIENT, CLUSTER = "open", "client", "cluster"

# Full method name -> who may call it. CLIENT methods also accept the cluster secret. A method missing here
# needs the cluster secret (fail closed). DrainInstance takes capacity away from every tenant, so it is an
# operator's call (cluster secret), not an API-key holder's.
ACCESS: dict[str, str] = {
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/jaxserve.v1.Scheduler/Generate": CLIENT,
    "/jaxserve.v1.Scheduler/Tokenize": CLIENT,
    "/jaxserve.v1.Scheduler/ListInstances": CLIENT,
    "/jaxserve.v1.Scheduler/GetStats": CLIENT,
    "/jaxserve.v1.Scheduler/DrainInstance": CLUSTER,
    "/jaxserve.v1.Scheduler/Register": CLUSTER,
    "/jaxserve.v1.Scheduler/ReportEvents": CLUSTER,
    "/jaxserve.v1.Scheduler/Deregister": CLUSTER,
    # The Instance service is internal throughout: the scheduler calls Generate/Prefill/Decode/Abort/
    # Profile/GetStats/Drain/PushKv, peers call PrepareKvTransfer/CommitKvTransfer (PD transfers, send-back
    # and peer fetch).
    # Requiring the secret on Prefill is what keeps an instance from dialling addresses for strangers.
    "/jaxserve.v1.Instance/Generate": CLUSTER,
    "/jaxserve.v1.Instance/GenerateMany": CLUSTER,
    "/jaxserve.v1.Instance/Prefill": CLUSTER,
    "/jaxserve.v1.Instance/Decode": CLUSTER,
    "/jaxserve.v1.Instance/PrepareKvTransfer": CLUSTER,
    "/jaxserve.v1.Instance/CommitKvTransfer": CLUSTER,
    "/jaxserve.v1.Instance/PushKv": CLUSTER,  # scheduler -> holder: offer a cached prefix to another instance
    "/jaxserve.v1.Instance/FetchKv": CLUSTER,  # peers pull KV bytes parked for them (kv_transport "grpc")
    "/jaxserve.v1.Instance/Abort": CLUSTER,
    "/jaxserve.v1.Instance/Profile": CLUSTER,
    "/jaxserve.v1.Instance/GetStats": CLUSTER,
    "/jaxserve.v1.Instance/Drain": CLUSTER,
}

API_KEY_ENV = "JAXSERVE_API_KEY"
CLUSTER_SECRET_ENV = "JAXSERVE_CLUSTER_SECRET"


def _check_secret(name: str, value: str | None) -> None:
    if value is None:
        return
    # gRPC metadata values must be printable ASCII; a space would break the "Bearer <secret>" split.
    if not value or not all(33 <= ord(c) < 127 for c in value):
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces")


@dataclasses.dataclass(frozen=True)
class Secrets:
    """The two shared secrets (None: not configured). `cluster_secret` defaults to `api_key`."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    cluster_secret: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        _check_secret("api_key", self.api_key)
        _check_secret("cluster_secret", self.cluster_secret)
        if self.cluster_secret is None and self.api_key is not None:
            object.__setattr__(self, "cluster_secret", self.api_key)

    @classmethod
    def resolve(cls, api_key: str | None = None, cluster_secret: str | None = None) -> "Secrets":
        """Flags first, then $JAXSERVE_API_KEY / $JAXSERVE_CLUSTER_SECRET; empty strings count as unset."""
        return cls(api_key=api_key or os.environ.get(API_KEY_ENV) or None,
                   cluster_secret=cluster_secret or os.environ.get(CLUSTER_SECRET_ENV) or None)

    @property
    def configured(self) -> bool:
        return self.cluster_secret is not None

    def allows(self, access: str, token: str | None) -> bool:
        """Whether a caller presenting `token` may call a method of this access level. A level whose secret
        is not configured is open (no API key: the client RPCs are open; no secret at all: everything)."""
        if access == OPEN or (access == CLIENT and self.api_key is None) or self.cluster_secret is None:
            return True
        if token is None:
            return False
        ok = _equal(token, self.cluster_secret)  # both compared, so timing tells nothing about which
        if access == CLIENT:  # several client keys (one per tenant) are comma-separated
            for key in self.api_key.split(","):
                ok = _equal(token, key) | ok
        return ok


def _equal(token: str, secret: str | None) -> bool:
    # Digests first: compare_digest's time depends on whether the lengths match, so this hides the length.
    if secret is None:
        return False
    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), hashlib.sha256(secret.encode()).digest())


def bearer_token(header: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def auth_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),) if secret else ()


# ------------------------------------------------------------------------------------------------ TLS
@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of one process: its certificate chain and key (its server identity, and its client identity
    on mTLS links) and the CA that signed its peers' certificates (verifies servers it dials; on a server,
    set: clients must present a certificate it signed)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (one is set, the other is not)")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"tls_{name}: no such file {path!r}")

    @classmethod
    def of(cls, cert_file: str | None = None, key_file: str | None = None,
           ca_file: str | None = None) -> "TlsFiles | None":
        """None when no file is given (plaintext), else the validated files."""
        if cert_file is None and key_file is None and ca_file is None:
            return None
        return cls(cert_file or None, key_file or None, ca_file or None)

    def _read(self, path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """require_client_cert: mTLS (needs ca_file); otherwise clients need no certificate."""
        if self.cert_file is None:
            raise ValueError("a TLS server needs tls_cert_file and tls_key_file")
        if require_client_cert and self.ca_file is None:
            raise ValueError("mTLS needs tls_ca_file (the CA that signed the clients' certificates)")
        pair = [(self._read(self.key_file), self._read(self.cert_file))]
        return grpc.ssl_server_credentials(pair, root_certificates=self._read(self.ca_file) if require_client_cert
                                           else None, require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server with ca_file (system roots without one) and present cert/key when set (mTLS)."""
        return grpc.ssl_channel_credentials(self._read(self.ca_file), self._read(self.key_file),
                                            self._read(self.cert_file))

    def op_channel_contexts(self):
        """(leader, follower) ssl.SSLContexts for a multi-process instance's device-op channel
        (jaxserve.engine.multihost): mTLS, each side presents this process's certificate and requires the
        other's, signed by ca_file. No hostname check: the follower dials the address the leader broadcast
        (often an IP its certificate need not name); any cluster certificate will do, and the HMAC handshake
        over the encrypted link still proves the cluster secret."""
        import ssl
        if self.cert_file is None or self.ca_file is None:
            raise ValueError("the op channel's mTLS needs tls_cert_file, tls_key_file and tls_ca_file")
        leader = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        follower = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        follower.check_hostname = False
        for context in (leader, follower):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(self.cert_file, self.key_file)
            context.load_verify_locations(self.ca_file)
        return leader, follower

    def ssl_context(self):
        """A server-side ssl.SSLContext for HTTPS (clients need no certificate)."""
        import ssl
        if self.cert_file is None:
            raise ValueError("HTTPS needs a certificate and key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


# -------------------------------------------------------------------------------------------- binding
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, secret: str | None, insecure: bool, what: str, flag: str = "--api_key") -> None:
    """Refuse a non-loopback bind with no secret configured, unless `insecure` (the --insecure flag)."""
    if secret is None and not insecure and not is_loopback(host):
        raise ValueError(f"{what}: refusing to bind {host!r} (not loopback) with no secret configured: anyone who "
                         f"reaches it could use it. Set {flag} (or ${API_KEY_ENV} / ${CLUSTER_SECRET_ENV}), or "
                         f"pass --insecure to serve unauthenticated")


# -------------------------------------------------------------------------------------- gRPC: servers
class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's bearer token against `ACCESS`; a refused call ends UNAUTHENTICATED without reaching
    the servicer."""

    def __init__(self, secrets: Secrets, service: str):
        self.secrets = secrets
        self.service = service

    async def intercept_service(self, continuation, details):
        access = ACCESS.get(details.method, CLUSTER)
        token = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                token = bearer_token(value if isinstance(value, str) else None)
        if self.secrets.allows(access, token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        which = "the cluster secret" if access == CLUSTER else "the API key (or the cluster secret)"
        why = "no 'authorization: Bearer' metadata" if token is None else "a wrong key"
        return _refusal(handler, f"{details.method} on the {self.service} needs {which}; the call had {why}")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    codec = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(deny, **codec)


def serve_port(server: grpc.aio.Server, address: str, tls: TlsFiles | None, *, require_client_cert: bool) -> int:
    """Bind `server` on `address`, over TLS when `tls` has a certificate; returns the port (0: failed)."""
    if tls is not None and tls.cert_file is not None:
        return server.add_secure_port(address, tls.server_credentials(require_client_cert=require_client_cert))
    return server.add_insecure_port(address)


# -------------------------------------------------------------------------------------- gRPC: clients
def _with_token(details, metadata):
    merged = grpc.aio.Metadata(*(tuple(details.metadata) if details.metadata else ()), *metadata)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, merged, details.credentials,
                                      details.wait_for_ready)


# One class per call kind: grpc.aio files each interceptor under the first kind it implements only.
class _Token:
    def __init__(self, metadata):
        self.metadata = metadata


class _UnaryUnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.metadata), request)


class _UnaryStreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.metadata), request)


class _StreamUnaryToken(_Token, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.metadata), request_iterator)


class _StreamStreamToken(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.metadata), request_iterator)


def token_interceptors(secret: str | None) -> list | None:
    """Client interceptors that send `secret` as a bearer token on every call of an aio channel."""
    if not secret:
        return None
    metadata = auth_metadata(secret)
    return [cls(metadata) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


def aio_channel(address: str, *, secret: str | None = None, tls: TlsFiles | None = None,
                credentials: grpc.ChannelCredentials | None = None, options=None) -> grpc.aio.Channel:
    """An asyncio channel that sends `secret` on every call, over TLS when `credentials` or `tls` is given
    (with `tls`: the CA to verify the server, and cert/key as client certificate for mTLS)."""
    interceptors = token_interceptors(secret)
    if credentials is None and tls is not None:
        credentials = tls.channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


@dataclasses.dataclass(frozen=True)
class LinkSecurity:
    """What a process needs for its internal links: the cluster secret it sends and checks, its TLS files,
    and `insecure` (allow a non-loopback bind with no secret). The default is the old behaviour: no auth, no
    TLS, loopback only."""

    secrets: Secrets = Secrets()
    tls: TlsFiles | None = None
    insecure: bool = False

    @property
    def mtls(self) -> bool:
        """Internal links use mTLS once a CA is given (without one there is nothing to verify peers with)."""
        return self.tls is not None and self.tls.ca_file is not None

    def channel(self, address: str, options=None) -> grpc.aio.Channel:
        """A channel to another process of the cluster: the cluster secret on every call, mTLS when set up."""
        return aio_channel(address, secret=self.secrets.cluster_secret, tls=self.tls if self.mtls else None,
                           options=options)
