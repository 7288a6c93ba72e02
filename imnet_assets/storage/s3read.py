"""Ranged reads of S3 objects through obstore (Rust's object_store), exact or an error; and the one
retry policy of every storage request (these reads, and s3fs's listings and writes, see fs).

A shard run reads each of its ~12,800 sources with one ranged GET, and the index reads remote tars
in 4 MB ranges. Through botocore each GET costs the reading process 2.6 times the CPU obstore
spends signing, sending and receiving it in Rust (bench/s3_client_cpu.py: 110 KB over TLS, 4.3 vs
1.65 ms on a loaded 2-core machine; the issue measured 0.5-0.75 vs 2.4 ms over plain HTTP). It is configured from the
standard variables, as s3fs is: the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), the region
(AWS_REGION / AWS_DEFAULT_REGION, else botocore's configuration), the credentials botocore's chain
finds (variables, shared files, SSO, the machine's or pod's role, session tokens; refreshed by
botocore when they expire), AWS_CA_BUNDLE (a private CA, added to the system's roots), HTTPS_PROXY
and NO_PROXY. Certificates are always verified.

Every read checks that it got exactly the bytes asked for: the answer's range (from its
Content-Range) and the body's length. A body cut short (a connection closed early, a middlebox that
rewrote Content-Length) is a transport fault, retried like a reset connection; a read never returns
fewer bytes than the object holds in the range. Fewer come back only where the object itself ends
(its size, from the same answer, says so), as a local file's read does.

`Retry` is the policy, one for every storage request: throttling (503 SlowDown, 429, 500, 502, 504)
and connection faults (refused, reset, cut bodies) back off with full jitter until a budget runs out
(IMNET_STORAGE_RETRY_SECONDS, default 300 s); a request that times out (connect 10 s, answer 15 s)
or gets no connection at all (refused, no such host) is tried again only while the first attempt
is less than TIMEOUT_RETRY_WITHIN old, so a silent or wrong endpoint fails within a minute, naming it; a refusal (403) is tried twice more (a credential being
rotated), then raised; a certificate the CA bundle does not vouch for is raised at once; anything
else is tried OTHER_ATTEMPTS times.

A bucket in another region than the one configured (or none configured): S3 answers 301
PermanentRedirect, which obstore does not follow (botocore, under s3fs, does). The first such answer
for a bucket makes this process ask the bucket's region once (`bucket_region`: HeadBucket through
botocore, whose answer names it in x-amz-bucket-region even when it is a 301 or a 403) and sign that
bucket's reads for it from then on (its store is made again); the read is tried again, uncounted.
Where no region can be found (an endpoint with no regions, a lookup that fails), or the one found
still answers 301, the read fails at once saying to set AWS_REGION.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from datetime import datetime, timedelta, timezone

RETRY_SECONDS_VARIABLE = "IMNET_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300
CONNECT_TIMEOUT = 10  # seconds to establish a connection (TLS included)
REQUEST_TIMEOUT = 15  # seconds for one request's answer to come back whole (a 4 MB range: well under 1 s)
TIMEOUT_RETRY_WITHIN = 20  # a timed-out request is tried again only this long after the first attempt
REFUSALS = 3  # attempts of a request the storage refuses (403) before it is raised
OTHER_ATTEMPTS = 3  # attempts of a request that failed in a way not classified below
FIRST_BACKOFF, MAX_BACKOFF = 0.1, 20.0  # seconds; the n-th wait is uniform(0, min(MAX, FIRST * 2**n))


def endpoint_url() -> str | None:
    """The S3 endpoint the standard variables name (None: AWS's own for the region)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region_name() -> str | None:
    """The region the standard variables name (None: botocore's configuration decides)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def retry_seconds() -> float:
    """The budget of retries of throttled or broken storage requests (IMNET_STORAGE_RETRY_SECONDS;
    settings.py validates it at start-up)."""
    text = os.environ.get(RETRY_SECONDS_VARIABLE, "").strip()
    return float(text) if text else float(DEFAULT_RETRY_SECONDS)


# no connection at all: refused, no such host (obstore says so in its debug dump)
_UNREACHABLE = re.compile(r"kind: Connect\b|ConnectError|Could not connect to the endpoint|Connection refused|"
                          r"Name or service not known|failed to lookup address|dns error|No route to host")
# HTTP statuses of a store too busy or failing for the moment (retried as throttling: fault_kind), told by
# obstore's message ("status code: 503") or by a botocore ClientError's response (_http_status)
_RETRIED_STATUSES = (429, 500, 502, 503, 504)
_STATUSES = "|".join(map(str, _RETRIED_STATUSES))
_THROTTLED = re.compile(rf"status code: ({_STATUSES})\b|\(({_STATUSES})\)|SlowDown|reduce your request rate|Throttl|InternalError|"
                        r"ServiceUnavailable|Service Unavailable")
# obstore names a timeout only in its debug dump ("kind: Timeout", "TimedOut"), next to settings
# such as "retry_timeout" that say nothing of this failure
_TIMED_OUT = re.compile(r"kind: Timeout|TimedOut|timed out|Read timeout|Connect timeout|deadline", re.IGNORECASE)
_CERTIFICATE = re.compile(r"invalid peer certificate|UnknownIssuer|CERTIFICATE_VERIFY_FAILED|certificate verify failed|"
                          r"SSL validation failed|SSLError|NotValidForName", re.IGNORECASE)
_CONNECTION = re.compile(r"connect|reset|closed|broken pipe|incomplete|error sending request|error decoding|"
                         r"body|premature|short read|end of file|EOF|payload|"
                         # botocore's answer to a body that is not the bytes sent (cut short with its length
                         # rewritten, garbled on the way): the object's own checksum did not match it
                         r"ChecksumError|did not match calculated checksum", re.IGNORECASE)
# S3's answer to a request sent to another region than the bucket's (obstore does not follow it, as
# botocore does: it names no Location)
_REDIRECTED = re.compile(r"redirect without LOCATION|status code: 301\b|\(301\)|PermanentRedirect|incorrectly configured region",
                         re.IGNORECASE)
_REFUSED = re.compile(r"status code: 40[13]\b|\(40[13]\)|AccessDenied|Forbidden|InvalidAccessKeyId|SignatureDoesNotMatch|"
                      r"ExpiredToken|Unauthenticated|PermissionDenied", re.IGNORECASE)


def fault_kind(e: BaseException) -> str:
    """What kind of failure `e` is, for `Retry`: "missing", "certificate", "timeout",
    "unreachable" (no connection at all), "throttled", "refused", "redirect" (the bucket is in another
    region), "connection" (one broken mid-request) or "other"."""
    text = f"{type(e).__name__}: {brief(e)}"  # not obstore's debug dump (it names every setting)
    if isinstance(e, FileNotFoundError):
        return "missing"
    if _CERTIFICATE.search(str(e)):
        return "certificate"
    if isinstance(e, TimeoutError) or _TIMED_OUT.search(str(e)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError) or _UNREACHABLE.search(str(e)):
        return "unreachable"
    if _THROTTLED.search(text) or _http_status(e) in _RETRIED_STATUSES:
        return "throttled"
    if isinstance(e, PermissionError) or _REFUSED.search(text):
        return "refused"
    if _REDIRECTED.search(text):
        return "redirect"
    if isinstance(e, (ConnectionError, ShortRead)) or _CONNECTION.search(text):
        return "connection"
    return "other"


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError's answer (s3fs's requests), else None. Its message
    names the error code of the answer's document only: a store's own code for a 5xx (MinIO's 503
    XMinioServerNotInitialized while it starts) is told a fault of the machinery by the status, as
    obstore's message names it."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


class StorageError(OSError):
    """Remote storage did not do what was asked (an unreachable or silent endpoint, refused
    credentials, a certificate not trusted, throttling or broken connections that outlasted the
    retries), with the object, the endpoint and what to check; never any credential."""


def brief(e: BaseException) -> str:
    """An error's message without the debug dump obstore appends to it."""
    return str(e).split("\n\nDebug source:", 1)[0].strip()


_ERROR_DOCUMENT = re.compile(r"<\?xml[^>]*>\s*<Error>(.*?)</Error>", re.DOTALL)
_FIELD = re.compile(r"<(Code|Message)>(.*?)</\1>", re.DOTALL)


def said(e: BaseException) -> str:
    """`brief(e)` on one line, for a message: an S3 error document obstore quotes whole (several
    lines of XML with its request ids) as its code and message."""

    def document(m: re.Match) -> str:
        fields = dict((k, v.strip()) for k, v in _FIELD.findall(m.group(1)))
        return ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v) or "(an error document)"

    return " ".join(_ERROR_DOCUMENT.sub(document, brief(e)).split())


class ShortRead(ConnectionError):
    """An answer that is not the bytes asked for (cut short, another range): a transport fault."""


class Retry:
    """One request's retries: `wait(e)` is the seconds to wait before trying again after `e`, or
    raises StorageError naming `what`, the endpoint and what to check once the policy says no more
    (a missing object: FileNotFoundError as it is)."""

    def __init__(self, what: str, budget: float | None = None):
        self.what = what
        self.start = time.monotonic()
        self.deadline = self.start + (retry_seconds() if budget is None else budget)
        self.attempts = 0
        self.kinds: dict[str, int] = {}

    def wait(self, e: BaseException) -> float:
        self.attempts += 1
        kind = fault_kind(e)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        now = time.monotonic()
        if kind in ("timeout", "unreachable"):
            again = now - self.start < TIMEOUT_RETRY_WITHIN
        elif kind in ("throttled", "connection"):
            again = now < self.deadline
        elif kind == "refused":
            again = self.kinds[kind] < REFUSALS
        elif kind == "other":
            again = self.kinds[kind] < OTHER_ATTEMPTS
        else:  # a missing object, a certificate nobody vouches for, another region: asking again changes nothing
            again = False
        if not again:
            raise self.gave_up(e, kind) from e
        backoff = random.uniform(0, min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(self.attempts - 1, 30)))
        if kind in ("timeout", "unreachable"):
            return min(backoff, max(0.0, self.start + TIMEOUT_RETRY_WITHIN - now))
        return max(0.0, min(backoff, self.deadline - now))

    def gave_up(self, e: BaseException, kind: str) -> BaseException:
        if kind == "missing" or isinstance(e, StorageError):
            return e
        took = time.monotonic() - self.start
        where = endpoint_url() or "AWS S3"
        text = (f"{self.what} at {where}: {type(e).__name__}: {said(e)} ({self.attempts} attempt"
                f"{'s' if self.attempts != 1 else ''} in {took:.0f} s")
        if kind == "unreachable":
            hint = "the endpoint cannot be reached: check AWS_ENDPOINT_URL and the network"
        elif kind == "timeout":
            hint = (f"the endpoint did not connect within {CONNECT_TIMEOUT} s or answer within {REQUEST_TIMEOUT} s: "
                    "check AWS_ENDPOINT_URL and the network")
        elif kind == "certificate":
            hint = _untrusted()
        elif kind in ("throttled", "connection"):
            hint = (f"throttled or broken connections, retried for up to {retry_seconds():.0f} s "
                    f"({RETRY_SECONDS_VARIABLE}): check AWS_ENDPOINT_URL and the network")
        elif kind == "redirect":
            hint = (f"the bucket is in another region than {_region()}, the one these requests were signed for, "
                    "and no answer named the bucket's region: set AWS_REGION to it "
                    "(`aws s3api get-bucket-location --bucket NAME`)")
        elif kind == "refused":
            hint = ("the storage refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or the machine's role) and the bucket's policy")
        else:
            hint = ""
        return StorageError(f"{text}{'; ' + hint if hint else ''})")


def _untrusted() -> str:
    """What to do about a certificate nobody vouched for: the bundle in use, and where the project's
    `.env` sets another one that the environment's overrides (a shell or image exporting the
    system's bundle: the environment wins over `.env`)."""
    from imnet_assets.settings import env_file, read_env_file

    bundle = os.environ.get("AWS_CA_BUNDLE") or ""
    if not bundle:
        return "its TLS certificate is not trusted and AWS_CA_BUNDLE is not set: set it to the CA's PEM file"
    hint = f"its TLS certificate is not trusted by AWS_CA_BUNDLE={bundle}: give the PEM file of the CA that signed it"
    try:
        path = env_file()
        in_file = read_env_file(path).get("AWS_CA_BUNDLE")
    except (OSError, ValueError):  # an unreadable .env says so elsewhere
        return hint
    if in_file and in_file != bundle:
        hint += f"; that one is set in the environment, which wins over AWS_CA_BUNDLE={in_file} in {path}: unset it there"
    return hint


# ----------------------------------------------------------------------------- obstore

# (pid, endpoint, region, CA bundle, bucket) -> S3Store: a process's store per bucket (obstore's
# connection pool is per store; a forked child makes its own).
_stores: dict[tuple, object] = {}
_stores_lock = threading.Lock()
# the same keys less the pid -> the region S3 said the bucket is in (None: asked, and none found): asked
# once per bucket, under _regions_lock (threads whose reads were redirected meanwhile wait for it); a
# child forked after it was asked signs for it from its first read
_regions: dict[tuple, str | None] = {}
_regions_lock = threading.Lock()


def _credentials():
    """botocore's credentials (the whole standard chain), or None (unsigned requests)."""
    import botocore.session

    return botocore.session.get_session().get_credentials()


class _CredentialProvider:
    """obstore's credential callback over botocore's credentials (which refresh themselves)."""

    def __init__(self, credentials):
        self.credentials = credentials
        self.refreshable = hasattr(credentials, "refresh_needed")

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        # refreshable ones (a role, SSO, a container's): asked again every minute, botocore renews them
        expires = datetime.now(timezone.utc) + timedelta(seconds=60) if self.refreshable else None
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": expires}


def _region() -> str:
    region = region_name()
    if region:
        return region
    import botocore.session

    return botocore.session.get_session().get_config_variable("region") or "us-east-1"


def _proxy(endpoint: str) -> dict:
    names = ("HTTPS_PROXY", "https_proxy") if endpoint.startswith("https") else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in (*names, "ALL_PROXY", "all_proxy") if os.environ.get(n)), None)
    if not proxy:
        return {}
    opts = {"proxy_url": proxy}
    excludes = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
    if excludes:
        opts["proxy_excludes"] = excludes
    return opts


def _store_key(bucket: str) -> tuple:
    return os.getpid(), endpoint_url(), region_name(), os.environ.get("AWS_CA_BUNDLE") or None, bucket


def store(bucket: str):
    """This process's obstore S3Store for `bucket`, configured from the standard variables, signing
    for the bucket's region once S3 said it is another (`_moved`)."""
    key = _store_key(bucket)
    found = _stores.get(key)
    if found is not None:
        return found
    with _stores_lock:
        if key not in _stores:
            _stores[key] = _make_store(bucket, key[1], key[3], _regions.get(key[1:]) or _region())
        return _stores[key]


def bucket_region(bucket: str) -> str | None:
    """The region S3 says `bucket` is in: x-amz-bucket-region of HeadBucket's answer (botocore's
    client, from the same variables; S3 names the region in a 301 or a 403 too), or None where
    no answer names one (an endpoint with no regions, no answer at all)."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = botocore.session.get_session()
    config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=REQUEST_TIMEOUT, retries={"total_max_attempts": 1},
                    **({} if session.get_credentials() else {"signature_version": UNSIGNED}))
    client = session.create_client("s3", region_name=_region(), endpoint_url=endpoint_url(), config=config)
    retry = Retry(f"HEAD s3://{bucket} (the bucket's region)")
    retried = ("throttled", "connection", "timeout", "unreachable")
    while True:
        try:
            return _named_region(client.head_bucket(Bucket=bucket)["ResponseMetadata"])
        except ClientError as e:
            found = _named_region(e.response.get("ResponseMetadata", {}))
            if found or fault_kind(e) not in retried:
                return found
            failure: Exception = e
        except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
            if fault_kind(e) not in retried:
                return None
            failure = e
        try:
            time.sleep(retry.wait(failure))
        except StorageError:
            return None  # no answer: the read's own error says what to set


def _named_region(metadata: dict) -> str | None:
    return metadata.get("HTTPHeaders", {}).get("x-amz-bucket-region") or None


def _moved(bucket: str, used) -> bool:
    """After S3 answered a read through store `used` that `bucket` is in another region: whether
    this process's store for `bucket` now signs for the region S3 names (asked once per bucket)."""
    key = _store_key(bucket)
    with _regions_lock:
        if _stores.get(key) is not used:
            return True  # made again meanwhile, by another thread's redirected read
        if key[1:] in _regions:
            return False  # asked already: no region found, or that one redirects too
        found = _regions[key[1:]] = bucket_region(bucket)
        if found is None or found == _region():
            return False
        with _stores_lock:
            _stores.pop(key, None)
        return True


def _make_store(bucket: str, endpoint: str | None, ca: str | None, region: str):
    from obstore.store import S3Store

    client = {"connect_timeout": timedelta(seconds=CONNECT_TIMEOUT), "timeout": timedelta(seconds=REQUEST_TIMEOUT),
              "pool_max_idle_per_host": "256",
              **_proxy(endpoint or "https://")}
    if endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True
    if ca:
        with open(ca, "rb") as f:
            client["root_certificate"] = f.read()
    config: dict = {"region": region}
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
        config["virtual_hosted_style_request"] = False  # path style, as botocore uses for a custom endpoint
    else:
        config["virtual_hosted_style_request"] = True
        config["endpoint"] = f"https://{bucket}.s3.{region}.amazonaws.com"
    credentials = _credentials()
    provider = None
    if credentials is None:
        config["skip_signature"] = True  # a public bucket, as botocore with no credentials would fail
    else:
        provider = _CredentialProvider(credentials)
    # obstore's own retries are off: every attempt comes back here, so that one policy (Retry)
    # decides, and a short answer is retried like a cut connection.
    return S3Store(bucket, config=config, client_options=client, retry_config={"max_retries": 0},
                   credential_provider=provider)


_PAST_END = re.compile(r"status code: 416\b|<Code>InvalidRange</Code>|range not satisfiable", re.IGNORECASE)


def _past_end(e: BaseException) -> bool:
    """Whether `e` is the storage's answer that the range starts at or past the object's end (416).
    Told by the status itself, never by a "416" anywhere in the text: a port, a duration."""
    return _PAST_END.search(brief(e)) is not None


WHOLE = 1 << 62  # the length of a ranged read that asks for a whole object (S3 answers what there is)


def get_range(bucket: str, key: str, offset: int, length: int) -> bytes:
    """`length` bytes of s3://bucket/key from `offset`: exactly those, or fewer only where the
    object ends (none from its end on). Raises FileNotFoundError for a missing object, and
    StorageError naming the object, the endpoint and what to check once `Retry` gives up."""
    if length <= 0:
        return b""
    import obstore
    from obstore.exceptions import NotFoundError

    s = store(bucket)
    span = "(the whole object)" if (offset, length) == (0, WHOLE) else f"bytes {offset}-{offset + length - 1}"
    retry = Retry(f"GET s3://{bucket}/{key} {span}")
    while True:
        try:
            result = obstore.get(s, key, options={"range": (offset, offset + length)})
            size = result.meta["size"]
            data = result.bytes()
            got = len(data)
            want = max(0, min(length, size - offset))
            if result.range != (offset, offset + want) or got != want:
                raise ShortRead(f"asked for bytes {offset}-{offset + length - 1} of an object of {size} bytes, "
                                f"got {got} bytes (range {result.range[0]}-{result.range[1] - 1})")
            return bytes(data)
        except NotFoundError:
            raise FileNotFoundError(f"s3://{bucket}/{key}") from None
        except Exception as e:  # noqa: BLE001 - obstore's errors are classified by Retry
            if _past_end(e):
                return b""
            if fault_kind(e) == "redirect" and _moved(bucket, s):
                s = store(bucket)  # signed for the bucket's region now: tried again at once
                continue
            time.sleep(retry.wait(e))
