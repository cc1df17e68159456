#!/usr/bin/python3
"""Minimal Docker/OCI registry token server for the Shoal e2e tests.

Implements the token endpoint of the Docker registry token-auth protocol
(https://distribution.github.io/distribution/spec/auth/token/):

  GET  /token?service=S&scope=repository:NAME:pull,push[&scope=...]   (HTTP Basic auth optional)
  POST /token  (OAuth2 form: grant_type=password|refresh_token, username, password, scope, ...)

On start it generates an EC P-256 key and a self-signed certificate, writes the certificate to
--cert-out (the registry's `auth.token.rootcertbundle`) and then serves. Tokens are ES256 JWTs
whose header carries both the certificate chain (`x5c`) and the libtrust-style key id (`kid`)
of the key, so distribution 2.x accepts them either way.

Access policy:
  * a request with Basic credentials that do not match any --user gets 401;
  * a matching user gets every requested action on repositories matching --grant (default '*');
  * anonymous requests get only `pull` on repositories matching --anonymous-pull (default none),
    i.e. an empty `access` claim for everything else, which the registry answers with 401.

Standard library + python3-jwt + python3-cryptography (Debian packages). Run with /usr/bin/python3.
"""

import argparse
import base64
import datetime
import fnmatch
import hashlib
import json
import os
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def libtrust_key_id(public_key):
    """Key ID as computed by docker/libtrust: base32 of the first 240 bits of
    sha256(DER SubjectPublicKeyInfo), in 12 colon-separated groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


def make_key_and_cert(common_name):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    # No extendedKeyUsage extension: Go's x509 verification then accepts the certificate for
    # any usage (distribution verifies x5c chains with the default ServerAuth usage).
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def parse_scope(scope):
    """'repository:foo/bar:pull,push' -> ('repository', 'foo/bar', ['pull', 'push']).
    The name may itself contain ':' (e.g. a registry host with a port), so split from the right."""
    typ, sep, rest = scope.partition(":")
    if not sep:
        return None
    name, sep, actions = rest.rpartition(":")
    if not sep or not name:
        return None
    return typ, name, [a for a in actions.split(",") if a]


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_handler(cfg):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "shoal-test-token-server/1"

        def log_message(self, fmt, *args):  # noqa: N802 (stdlib name)
            if cfg.verbose:
                sys.stderr.write("token-server: " + (fmt % args) + "\n")

        def _send_json(self, status, obj, extra_headers=()):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra_headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _unauthorized(self, msg):
            with cfg.lock:
                cfg.stats["denied"] += 1
            self._send_json(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": msg}]},
                [("WWW-Authenticate", 'Basic realm="shoal-test-token-server"')],
            )

        def _basic_user(self):
            """None for anonymous, a username for valid credentials, False for bad ones."""
            header = self.headers.get("Authorization", "")
            if not header:
                return None
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except Exception:  # noqa: BLE001 - any decoding problem is bad credentials
                return False
            return self._check(user, password)

        def _check(self, user, password):
            expected = cfg.users.get(user)
            if expected is not None and secrets.compare_digest(expected, password):
                return user
            return False

        def do_GET(self):  # noqa: N802
            url = urlsplit(self.path)
            if url.path in ("/", "/healthz"):
                self._send_json(200, {"ok": True, "stats": cfg.stats})
                return
            if url.path != cfg.path:
                self._send_json(404, {"error": "not found"})
                return
            q = parse_qs(url.query)
            user = self._basic_user()
            if user is False:
                self._unauthorized("invalid username or password")
                return
            self._issue(user, q.get("service", [""])[0], q.get("scope", []), oauth=False)

        def do_POST(self):  # noqa: N802
            url = urlsplit(self.path)
            if url.path != cfg.path:
                self._send_json(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            grant = form.get("grant_type", [""])[0]
            if grant == "password":
                user = self._check(form.get("username", [""])[0], form.get("password", [""])[0])
            elif grant == "refresh_token":
                user = cfg.refresh_tokens.get(form.get("refresh_token", [""])[0], False)
            else:
                self._send_json(400, {"error": "unsupported_grant_type"})
                return
            if user is False:
                self._unauthorized("invalid credentials")
                return
            scopes = []
            for s in form.get("scope", []):
                scopes.extend(s.split(" "))
            self._issue(user, form.get("service", [""])[0], scopes, oauth=True)

        def _issue(self, user, service, scopes, oauth):
            if service and service != cfg.service:
                self._send_json(400, {"errors": [{"code": "DENIED", "message": "unknown service"}]})
                return
            access = []
            for scope in scopes:
                for one in scope.split(" "):
                    parsed = parse_scope(one)
                    if parsed is None:
                        continue
                    typ, name, actions = parsed
                    if typ != "repository":
                        continue
                    if user is not None:
                        allowed = actions if any(fnmatch.fnmatchcase(name, g) for g in cfg.grant) else []
                    else:
                        allowed = (
                            ["pull"]
                            if "pull" in actions
                            and any(fnmatch.fnmatchcase(name, p) for p in cfg.anonymous_pull)
                            else []
                        )
                    access.append({"type": typ, "name": name, "actions": allowed})
            now = int(time.time())
            claims = {
                "iss": cfg.issuer,
                "sub": user or "",
                "aud": cfg.service,
                "exp": now + cfg.ttl,
                "nbf": now - 10,
                "iat": now,
                "jti": secrets.token_hex(16),
                "access": access,
            }
            headers = {"kid": cfg.kid}
            if not cfg.no_x5c:
                headers["x5c"] = [cfg.cert_b64]
            token = jwt.encode(claims, cfg.key_pem, algorithm="ES256", headers=headers)
            with cfg.lock:
                cfg.stats["issued"] += 1
                if user is not None:
                    cfg.stats["issued_authenticated"] += 1
            body = {
                "token": token,
                "access_token": token,
                "expires_in": cfg.ttl,
                "issued_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
                .isoformat()
                .replace("+00:00", "Z"),
            }
            if oauth and user is not None:
                refresh = secrets.token_hex(16)
                cfg.refresh_tokens[refresh] = user
                body["refresh_token"] = refresh
            self._send_json(200, body)

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    ap.add_argument("--cert-out", required=True, help="where to write the PEM certificate")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--service", default="shoal-test-registry")
    ap.add_argument("--issuer", default="shoal-test-issuer")
    ap.add_argument("--path", default="/token")
    ap.add_argument("--user", action="append", default=[], help="USER:PASSWORD (repeatable)")
    ap.add_argument("--grant", action="append", default=[],
                    help="repository glob that authenticated users get every action on (default '*')")
    ap.add_argument("--anonymous-pull", action="append", default=[],
                    help="repository glob anonymous clients may pull (default: none)")
    ap.add_argument("--ttl", type=int, default=300, help="token lifetime in seconds")
    ap.add_argument("--no-x5c", action="store_true", help="sign with kid only (no x5c header)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    users = {}
    for spec in args.user:
        name, sep, password = spec.partition(":")
        if not sep or not name:
            ap.error(f"--user wants USER:PASSWORD, got {spec!r}")
        users[name] = password

    key, cert = make_key_and_cert(args.issuer)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    tmp = args.cert_out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(cert_pem)
    os.replace(tmp, args.cert_out)

    class Cfg:
        pass

    cfg = Cfg()
    cfg.service = args.service
    cfg.issuer = args.issuer
    cfg.path = args.path
    cfg.users = users
    cfg.grant = args.grant or ["*"]
    cfg.anonymous_pull = args.anonymous_pull
    cfg.ttl = args.ttl
    cfg.no_x5c = args.no_x5c
    cfg.verbose = args.verbose
    cfg.key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cfg.kid = libtrust_key_id(key.public_key())
    cfg.cert_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    cfg.refresh_tokens = {}
    cfg.lock = threading.Lock()
    cfg.stats = {"issued": 0, "issued_authenticated": 0, "denied": 0}

    host, _, port = args.listen.rpartition(":")
    server = TokenServer((host or "127.0.0.1", int(port)), make_handler(cfg))
    bound = server.server_address[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{bound}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"token-server listening on {host}:{bound} kid={cfg.kid}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
