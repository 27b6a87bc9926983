"""SigV4 redaction and credential scopes, on requests signed by the real SDK (botocore)."""

from __future__ import annotations

from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from sensor import sigv4
from sensor.httprequest import CapturedRequest, DuplicateHeader
from tests.awsrequests import ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, call_offline, offline_requests

KEY = b"sensor-hash-key-0123456789abcdef"


def _signed(service="s3", method="get_object", token=None, **kwargs) -> CapturedRequest:
    with offline_requests(service, session_token=token) as (client, rec):
        call_offline(client, method, **kwargs)
    assert len(rec.requests) == 1
    return rec.requests[0]


def _secrets_in(req: CapturedRequest) -> list[str]:
    text = repr(req)
    return [s for s in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN) if s in text]


def test_header_signature_redacted_scope_kept():
    raw = _signed(token=SESSION_TOKEN, Bucket="research-corpus-v2", Key="papers/7.pdf")
    assert ACCESS_KEY in raw.header("Authorization") and "Signature=" in raw.header("Authorization")
    red = sigv4.redact(raw, KEY)
    assert _secrets_in(red) == []
    auth = red.header("Authorization")
    assert "Signature" not in auth and "SignedHeaders=" in auth
    assert red.header("X-Amz-Security-Token") == sigv4.REDACTED
    cred = sigv4.credential(red)
    assert (cred.region, cred.service, cred.key_kind, cred.kind) == ("us-east-1", "s3", "AKIA", "long-term")
    assert cred.session_token and not cred.presigned
    assert cred.key_hash.startswith("hmac-sha256:") and len(cred.key_hash) == len("hmac-sha256:") + 32


def test_key_hash_is_keyed_and_stable():
    raw = _signed(Bucket="b", Key="k")
    a = sigv4.credential(sigv4.redact(raw, KEY)).key_hash
    assert a == sigv4.credential(sigv4.redact(raw, KEY)).key_hash
    assert a != sigv4.credential(sigv4.redact(raw, b"another-sensor-key-000000000000")).key_hash
    with pytest.raises(ValueError):
        sigv4.redact(raw, b"short")


def test_presigned_sigv4_query_redacted():
    c = boto3.client("s3", region_name="eu-west-1", aws_access_key_id="ASIAIOSFODNN7EXAMPLE",
                     aws_secret_access_key=SECRET_KEY, aws_session_token=SESSION_TOKEN,
                     config=Config(signature_version="s3v4"))
    url = urlsplit(c.generate_presigned_url("get_object", Params={"Bucket": "research-corpus-v2", "Key": "papers/7.pdf"}))
    raw = CapturedRequest("GET", url.netloc, f"{url.path}?{url.query}")
    with pytest.raises(sigv4.UnredactedCredentials):
        sigv4.credential(raw)
    red = sigv4.redact(raw, KEY)
    assert "ASIAIOSFODNN7EXAMPLE" not in red.target and SESSION_TOKEN not in red.target
    assert "X-Amz-Signature" not in red.target
    cred = sigv4.credential(red)
    assert cred.presigned and cred.session_token and cred.key_kind == "ASIA" and cred.region == "eu-west-1"


def test_sigv2_is_redacted_and_not_decoded():
    c = boto3.client("s3", region_name="us-east-1", aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     config=Config(signature_version="s3"))
    url = urlsplit(c.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"}))
    red = sigv4.redact(CapturedRequest("GET", url.netloc, f"{url.path}?{url.query}"), KEY)
    assert ACCESS_KEY not in red.target and "Signature=" not in red.target
    with pytest.raises(sigv4.Unsigned):
        sigv4.credential(red)
    hdr = sigv4.redact(CapturedRequest("GET", "s3.amazonaws.com", "/b/k", (("Authorization", f"AWS {ACCESS_KEY}:c2lnbmF0dXJl"),)), KEY)
    assert hdr.header("Authorization") == "AWS redacted"
    with pytest.raises(sigv4.Unsigned):
        sigv4.credential(hdr)


def test_unknown_scheme_and_malformed_sigv4_keep_nothing():
    red = sigv4.redact(CapturedRequest("GET", "h", "/", (("Authorization", "sk-live-secret-token"),)), KEY)
    assert red.header("Authorization") == sigv4.REDACTED
    bad = sigv4.redact(CapturedRequest("GET", "h", "/", (("Authorization", f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/x"),)), KEY)
    assert ACCESS_KEY not in repr(bad)
    with pytest.raises(sigv4.SigV4Error):
        sigv4.credential(bad)


def test_unredacted_requests_are_refused():
    raw = _signed(token=SESSION_TOKEN, Bucket="b", Key="k")
    with pytest.raises(sigv4.UnredactedCredentials):
        sigv4.credential(raw)
    forged = sigv4.redact(raw, KEY).with_changes(
        headers=tuple((k, v + ", Signature=abc" if k.lower() == "authorization" else v) for k, v in raw.headers))
    with pytest.raises(sigv4.UnredactedCredentials):
        sigv4.credential(forged)


def test_chunk_signed_body_is_dropped():
    raw = CapturedRequest("PUT", "s3.amazonaws.com", "/b/k",
                          (("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
                           ("Authorization", f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20250101/us-east-1/s3/aws4_request, "
                                             "SignedHeaders=host, Signature=00")),
                          b"5;chunk-signature=abcdef\r\nhello\r\n", False)
    red = sigv4.redact(raw, KEY)
    assert red.body == b"" and red.truncated


def test_sigv4a_region_set():
    raw = CapturedRequest("GET", "mrap.accesspoint.s3-global.amazonaws.com", "/k",
                          (("Authorization", f"AWS4-ECDSA-P256-SHA256 Credential={ACCESS_KEY}/20250101/s3/aws4_request, "
                                             "SignedHeaders=host;x-amz-region-set, Signature=3045"),
                           ("X-Amz-Region-Set", "us-east-1,us-west-2")))
    cred = sigv4.credential(sigv4.redact(raw, KEY))
    assert cred.region is None and cred.region_set == ("us-east-1", "us-west-2") and cred.service == "s3"


def test_duplicate_authorization_is_refused():
    req = CapturedRequest("GET", "h", "/", (("Authorization", "a"), ("authorization", "b")))
    with pytest.raises(DuplicateHeader):
        req.header("Authorization")
