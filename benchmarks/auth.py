"""The cost of authentication on a QIDO-RS request: median latency with ``[auth]`` off vs on.

Two data directories get the same generated corpus (``bastion import``); the same ``bastion serve`` build runs on
each at once, one with auth off, one with auth on (a ``jwks_file`` with a key made here, a token signed with it,
sent as ``Authorization: Bearer``). Requests ``GET /dicom-web/studies?PatientID=...`` alternate between the two (the
order swapped every pair, one kept-alive httpx connection each), so the machine's load falls on both alike; the
difference of the medians is the overhead of the access check with a token already verified once (the common case:
a viewer sends the same token for its whole session). The first request with a new token (signature verified) is
timed separately, and so is the middleware alone, in process.

Usage: ``.venv/bin/python benchmarks/auth.py [--instances 200] [--requests 3000] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import servers
from corpus import ensure_corpus
from joserfc import jwt
from joserfc.jwk import RSAKey

ROOT = Path(__file__).resolve().parents[1]
BASTION = str(ROOT / ".venv" / "bin" / "bastion")
ISSUER = "https://issuer.bench.invalid"
AUDIENCE = "bastion"


def timed(client: httpx.Client, url: str, headers: dict[str, str], count: int) -> list[float]:
    """Milliseconds of each of ``count`` sequential GETs (each must succeed)."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        rsp = client.get(url, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if rsp.status_code != 200:
            raise RuntimeError(f"QIDO answered {rsp.status_code}: {rsp.text[:200]}")
    return out


def middleware_us(jwks: Path, token: str, count: int = 20000) -> float:
    """Microseconds per request the access check adds in process (the ASGI middleware around a do-nothing app,
    the token already verified): the overhead without the network and the machine's noise."""
    import asyncio

    from bastion.archive import Archive
    from bastion.auth.authenticator import Authenticator
    from bastion.settings import load_settings
    from bastion.web.access import AccessControl

    with tempfile.TemporaryDirectory(prefix="bench-auth-mw-") as tmp:
        settings = load_settings(env={"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": ISSUER,
                                      "BASTION_AUTH_AUDIENCE": AUDIENCE, "BASTION_AUTH_JWKS_FILE": str(jwks)},
                                 data=tmp)
        archive = Archive.open(settings)
        try:
            async def app(scope: dict, receive: object, send: object) -> None:
                return None

            async def run() -> float:
                mw = AccessControl(app, archive, Authenticator(settings))  # type: ignore[arg-type]
                scope = {"type": "http", "method": "GET", "path": "/dicom-web/studies", "client": ("127.0.0.1", 1),
                         "headers": [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())]}
                await mw(dict(scope), None, None)  # type: ignore[arg-type]  # verifies the token once
                t0 = time.perf_counter()
                for _ in range(count):
                    await mw(dict(scope), None, None)  # type: ignore[arg-type]
                return (time.perf_counter() - t0) / count * 1e6

            return asyncio.run(run())
        finally:
            archive.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        files = ensure_corpus("small", args.instances, work / "corpus")
        for name in ("off", "on"):
            subprocess.run([BASTION, "import", "--data", str(work / name), str(work / "corpus")], check=True,
                           capture_output=True)
        import pydicom

        patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
        key = RSAKey.generate_key(2048, auto_kid=True)
        jwks = work / "jwks.json"
        jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
        env_on = {"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": ISSUER, "BASTION_AUTH_AUDIENCE": AUDIENCE,
                  "BASTION_AUTH_JWKS_FILE": str(jwks)}
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "roles": ["viewer"], "iat": now, "exp": now + 3600}
        token = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key, algorithms=["RS256"])
        path = f"/dicom-web/studies?PatientID={patient}"
        args_ = ["--workers", "1", "--log-level", "WARNING"]
        with servers.bastion(args_, data=work / "off", name="bastion-auth-off") as off_server, \
                servers.bastion(args_, data=work / "on", env=env_on, name="bastion-auth-on") as on_server:
            off_url, on_url = off_server.base_url, on_server.base_url
            with httpx.Client(timeout=30) as off_client, httpx.Client(timeout=30) as on_client:
                bearer = {"Authorization": f"Bearer {token}"}
                first_use = timed(on_client, on_url + path, bearer, 1)[0]
                timed(off_client, off_url + path, {}, 200)
                timed(on_client, on_url + path, bearer, 200)
                off_ms: list[float] = []
                on_ms: list[float] = []
                # Interleaved, the order swapped every pair: the machine's load falls on both alike.
                for i in range(args.requests):
                    pair = [(off_client, off_url, {}, off_ms), (on_client, on_url, bearer, on_ms)]
                    for client, url, headers, out in (pair if i % 2 else pair[::-1]):
                        out += timed(client, url + path, headers, 1)
        diffs = [b - a for a, b in zip(off_ms, on_ms, strict=True)]
        off, on_ = statistics.median(off_ms), statistics.median(on_ms)
        result = {"instances": args.instances, "requests": args.requests, "median_ms_off": round(off, 3),
                  "median_ms_on": round(on_, 3), "overhead_ms": round(on_ - off, 3),
                  "median_paired_difference_ms": round(statistics.median(diffs), 3),
                  "first_use_ms": round(first_use, 3), "middleware_us": round(middleware_us(jwks, token), 1)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"QIDO median over {args.requests} interleaved requests: auth off {off:.3f} ms, auth on {on_:.3f} ms, "
                  f"overhead {on_ - off:+.3f} ms (median paired difference {result['median_paired_difference_ms']:+.3f}"
                  f" ms); first request with a new token {first_use:.1f} ms; the access check in process "
                  f"{result['middleware_us']} us per request")


if __name__ == "__main__":
    main()
