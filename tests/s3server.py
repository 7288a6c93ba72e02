"""moto's real S3 HTTP server on 127.0.0.1 (a free port), for tests that use `s3://` roots.

It is the same WSGI application and request handler `moto_server` runs, served by werkzeug in a
thread, with one addition: every request is recorded (method, bucket/key, Range header, status),
so tests can tell ranged reads from whole-object downloads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import unquote

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

REGION = "us-east-1"
ACCESS_KEY = "AKIAIMNETTESTKEY0001"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # "/bucket/key" (path-style, unquoted)
    range: str | None  # the Range header, e.g. "bytes=0-99"
    status: int
    query: str
    access_key: str | None  # the key id the request was signed with (never the secret)

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").partition("/")[0]

    @property
    def key(self) -> str:
        return self.path.lstrip("/").partition("/")[2]


def _signing_key(authorization: str) -> str | None:
    # "AWS4-HMAC-SHA256 Credential=<key id>/<date>/<region>/s3/aws4_request, SignedHeaders=..., Signature=..."
    _, found, rest = authorization.partition("Credential=")
    return rest.split("/", 1)[0] if found else None


class _QuietHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's line per request on stderr (the recorder keeps them)."""

    def log_request(self, *args, **kwargs) -> None:
        pass


class _Recorder:
    def __init__(self, app, log: list[Request], lock: threading.Lock):
        self.app, self.log, self.lock = app, log, lock

    def __call__(self, environ, start_response):
        seen: dict = {}

        def recording_start(status, headers, exc_info=None):
            seen["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        result = self.app(environ, recording_start)
        with self.lock:
            self.log.append(
                Request(
                    environ.get("REQUEST_METHOD", ""), unquote(environ.get("PATH_INFO", "")),
                    environ.get("HTTP_RANGE"), seen.get("status", 0), environ.get("QUERY_STRING", ""),
                    _signing_key(environ.get("HTTP_AUTHORIZATION", "")),
                )
            )
        return result


def private_ca(folder) -> tuple[str, object]:
    """A private certificate authority and a server certificate it signed for 127.0.0.1 (made with
    `cryptography`): (the CA's PEM file, for AWS_CA_BUNDLE; an ssl.SSLContext serving the server's)."""
    import datetime
    import ipaddress
    import ssl
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder = Path(folder)

    def cert(subject, issuer, key, signer, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imnet test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key, False)
    ca_pem = folder / "ca.pem"
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    return str(ca_pem), ctx


class MotoS3:
    """Start with `with MotoS3() as s3:`; `s3.endpoint`, `s3.env(secret)`, `s3.client(secret)`.
    With `ssl_context` (see `private_ca`) it serves HTTPS."""

    def __init__(self, secret: str = "imnet-test-secret", ssl_context=None, ca_bundle: str | None = None):
        self.secret = secret
        self.ca_bundle = ca_bundle
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        app = _Recorder(DomainDispatcherApplication(create_backend_app), self.requests, self._lock)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler,
                                   ssl_context=ssl_context)
        self.port = self._server.server_address[1]
        self.endpoint = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)

    def start(self) -> MotoS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            **({"AWS_CA_BUNDLE": self.ca_bundle} if self.ca_bundle else {}),
        }

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=self.secret, verify=self.ca_bundle,
        )

    def mark(self) -> int:
        """A position in the request log; `since(mark)` gives the requests after it."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        with self._lock:
            return list(self.requests[mark:])

    # ------------------------------------------------------------------ bucket helpers

    def put_tree(self, client, folder, bucket: str, prefix: str) -> list[str]:
        """Upload every file under `folder` to s3://bucket/prefix/<relative path>."""
        from pathlib import Path

        keys = []
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                key = f"{prefix.strip('/')}/{p.relative_to(folder).as_posix()}"
                client.upload_file(str(p), bucket, key)
                keys.append(key)
        return keys

    @staticmethod
    def download(objects: dict[str, bytes], prefix: str, folder) -> None:
        """Write `all_objects`' result under `folder`, each key less `prefix` (as a user's copy)."""
        from pathlib import Path

        for key, data in objects.items():
            dst = Path(folder) / key[len(prefix):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)

    @staticmethod
    def fresh_buckets(client, *buckets: str) -> None:
        """Each bucket made, and emptied of what an earlier test left (objects, unfinished multipart
        uploads): moto's state is the pytest process's, not one server's."""
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
            for key in MotoS3.all_objects(client, bucket):
                client.delete_object(Bucket=bucket, Key=key)
            for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    @staticmethod
    def all_objects(client, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """key -> bytes of every object under a prefix."""
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out
