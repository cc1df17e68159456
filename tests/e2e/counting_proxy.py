#!/usr/bin/python3
"""Byte-counting HTTP/1.1 proxy for the Shoal e2e tests (stdlib only, one thread per connection).

Sits in front of an upstream registry and counts every byte it sends back to its clients, in
total and per request path, so a test measures upstream egress at the registry side instead of
trusting what Shoal reports about itself:

  counting_proxy.py --target 127.0.0.1:5000 --port-file D/port --stats D/stats.json

HTTP-aware: each client connection is handled request by request (no pipelining; reqwest,
skopeo and curl do not pipeline), with bodies delimited by Content-Length, chunked encoding or
connection close, so bytes are attributed to the request that produced them. Counters are live
(updated after every forwarded piece), so a test can watch a transfer in progress. A connection
that does not start like an HTTP request (skopeo's TLS probe) is relayed unparsed, so the
registry answers it as it would directly; its bytes count under the path "(non-HTTP)". When the
target refuses a connection, the client's connection is closed (counted in connect_failures).

The stats JSON is rewritten atomically every --interval seconds (0: never), on SIGUSR1 and at
exit (SIGTERM/SIGINT). Its fields:

  seq               increases with every write (wait for it to change after a SIGUSR1)
  total_bytes       every byte sent to clients (response heads + bodies)
  blob_bytes        response body bytes (as sent, chunk framing included) of requests whose
                    path contains /blobs/
  manifest_bytes    response body bytes of .../manifests/... requests
  other_bytes       the remaining response body bytes (/v2/, tokens, ...)
  head_bytes        response head bytes
  requests, connections, connect_failures (upstream refused/unreachable), client_aborts
  by_path           {path without query: {requests, bytes, body_bytes, methods{}, statuses{}}}
  by_blob           {sha256:...: response body bytes sent for that blob (any repository)}
  in_flight         requests being answered: {id, method, path, client, body_bytes, started}
  log               the last --log-max finished requests:
                    {id, method, path, client, status, body_bytes, started, ended}

One line per finished request also goes to stdout:
  <id> <client> <METHOD> <path> -> <status> <body bytes> B in <seconds> s
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
MAX_HEAD = 256 * 1024


class Stats:
    def __init__(self, path, listen, target, log_max):
        self.path = path
        self.listen = listen
        self.target = target
        self.log_max = log_max
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.seq = 0
        self.total_bytes = 0
        self.head_bytes = 0
        self.kind_bytes = {"blob": 0, "manifest": 0, "other": 0}
        self.requests = 0
        self.connections = 0
        self.connect_failures = 0
        self.client_aborts = 0
        self.by_path = {}
        self.by_blob = {}
        self.in_flight = {}
        self.log = []
        self.next_id = 0
        self.started = time.time()

    def new_request(self, method, path, client):
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            self.requests += 1
            p = self.by_path.setdefault(path, {"requests": 0, "bytes": 0, "body_bytes": 0, "methods": {}, "statuses": {}})
            p["requests"] += 1
            p["methods"][method] = p["methods"].get(method, 0) + 1
            self.in_flight[rid] = {
                "id": rid, "method": method, "path": path, "client": client, "status": None,
                "body_bytes": 0, "started": round(time.time(), 3),
            }
            return rid

    def sent(self, rid, path, n, body):
        kind = path_kind(path)
        with self.lock:
            self.total_bytes += n
            p = self.by_path[path]
            p["bytes"] += n
            if body:
                self.kind_bytes[kind] += n
                p["body_bytes"] += n
                if kind == "blob":
                    d = blob_digest(path)
                    if d:
                        self.by_blob[d] = self.by_blob.get(d, 0) + n
                r = self.in_flight.get(rid)
                if r is not None:
                    r["body_bytes"] += n
            else:
                self.head_bytes += n

    def status(self, rid, path, status):
        with self.lock:
            p = self.by_path[path]
            p["statuses"][str(status)] = p["statuses"].get(str(status), 0) + 1
            r = self.in_flight.get(rid)
            if r is not None:
                r["status"] = status

    def done(self, rid):
        with self.lock:
            r = self.in_flight.pop(rid, None)
            if r is None:
                return None
            r["ended"] = round(time.time(), 3)
            self.log.append(r)
            if len(self.log) > self.log_max:
                del self.log[: len(self.log) - self.log_max]
            return r

    def bump(self, field):
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)

    def snapshot(self):
        with self.lock:
            self.seq += 1
            return {
                "seq": self.seq,
                "time": round(time.time(), 3),
                "uptime": round(time.time() - self.started, 3),
                "listen": self.listen,
                "target": self.target,
                "total_bytes": self.total_bytes,
                "head_bytes": self.head_bytes,
                "blob_bytes": self.kind_bytes["blob"],
                "manifest_bytes": self.kind_bytes["manifest"],
                "other_bytes": self.kind_bytes["other"],
                "requests": self.requests,
                "connections": self.connections,
                "connect_failures": self.connect_failures,
                "client_aborts": self.client_aborts,
                "by_path": json.loads(json.dumps(self.by_path)),
                "by_blob": dict(self.by_blob),
                "in_flight": [dict(r) for r in self.in_flight.values()],
                "log": [dict(r) for r in self.log],
            }

    def write(self):
        if not self.path:
            return
        with self.write_lock:
            snap = self.snapshot()
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(snap, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)


def path_kind(path):
    if "/blobs/" in path:
        return "blob"
    if "/manifests/" in path:
        return "manifest"
    return "other"


def blob_digest(path):
    tail = path.rsplit("/blobs/", 1)[-1]
    return tail if tail.startswith("sha256:") else None


class Conn:
    """A socket with a read buffer: read_head, read_line, read_some."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self):
        """Bytes up to and including the blank line; b"" on a clean EOF before any byte."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("head too large")
            if not self._fill():
                if self.buf:
                    raise ValueError("EOF inside a head")
                return b""
        i = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:i], self.buf[i:]
        return head

    def read_line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("line too long")
            if not self._fill():
                raise ValueError("EOF inside a chunked body")
        i = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_some(self, limit):
        """Up to limit bytes (at least one); b"" at EOF."""
        if not self.buf and not self._fill():
            return b""
        out, self.buf = self.buf[:limit], self.buf[limit:]
        return out


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        k = k.strip().lower()
        v = v.strip()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return first, headers


def forward_body(src, emit, headers, mode):
    """Forward one message body from src via emit(bytes). mode: 'request' or 'response'
    (a response without a length runs to EOF). Returns True if the connection must close."""
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            line = src.read_line()
            emit(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    t = src.read_line()
                    emit(t)
                    if t == b"\r\n":
                        return False
            left = size + 2  # data + CRLF
            while left:
                data = src.read_some(min(left, CHUNK))
                if not data:
                    raise ValueError("EOF inside a chunk")
                emit(data)
                left -= len(data)
    if "content-length" in headers:
        left = int(headers["content-length"].split(",")[0])
        while left:
            data = src.read_some(min(left, CHUNK))
            if not data:
                raise ValueError(f"EOF with {left} body bytes missing")
            emit(data)
            left -= len(data)
        return False
    if mode == "request":
        return False
    while True:  # response delimited by connection close
        data = src.read_some(CHUNK)
        if not data:
            return True
        emit(data)


def raw_pipe(client, up_sock, rid, stats):
    """Not HTTP (e.g. a TLS ClientHello: skopeo probes https first): relay both ways unparsed,
    counting upstream -> client bytes as path RAW_PATH, so the registry answers the probe as if
    the client talked to it directly."""

    def client_to_up():
        try:
            if client.buf:
                up_sock.sendall(client.buf)
                client.buf = b""
            while True:
                data = client.sock.recv(CHUNK)
                if not data:
                    break
                up_sock.sendall(data)
        except OSError:
            pass
        try:
            up_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=client_to_up, daemon=True)
    t.start()
    try:
        while True:
            data = up_sock.recv(CHUNK)
            if not data:
                break
            client.sock.sendall(data)
            stats.sent(rid, RAW_PATH, len(data), True)
    except OSError:
        pass
    try:
        client.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t.join(timeout=30)


RAW_PATH = "(non-HTTP)"


def handle(client_sock, addr, target, stats, verbose):
    client = Conn(client_sock)
    cname = f"{addr[0]}:{addr[1]}"
    up = None
    stats.bump("connections")
    try:
        client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not client._fill():
            return
        if not (65 <= client.buf[0] <= 90):  # an HTTP request starts with an upper-case method
            try:
                s = socket.create_connection(target, timeout=10)
                s.settimeout(None)
            except OSError:
                stats.bump("connect_failures")
                return
            up = Conn(s)
            rid = stats.new_request("RAW", RAW_PATH, cname)
            try:
                raw_pipe(client, s, rid, stats)
            finally:
                stats.done(rid)
            return
        while True:
            head = client.read_head()
            if not head:
                return
            first, headers = parse_head(head)
            parts = first.split(" ")
            method = parts[0] if parts else "?"
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else "?"
            if up is None:
                try:
                    s = socket.create_connection(target, timeout=10)
                    s.settimeout(None)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    up = Conn(s)
                except OSError as e:
                    stats.bump("connect_failures")
                    print(f"- {cname} {method} {path} -> upstream {target[0]}:{target[1]} unreachable: {e}", flush=True)
                    return  # like a dead registry: the client sees its connection closed
            rid = stats.new_request(method, path, cname)
            t0 = time.monotonic()
            status = 0
            try:
                up.sock.sendall(head)
                forward_body(client, up.sock.sendall, headers, "request")

                def to_client_body(data):
                    client_sock.sendall(data)
                    stats.sent(rid, path, len(data), True)

                while True:
                    rhead = up.read_head()
                    if not rhead:
                        raise ValueError("upstream closed the connection before a response")
                    rfirst, rheaders = parse_head(rhead)
                    status = int(rfirst.split(" ")[1])
                    client_sock.sendall(rhead)
                    stats.sent(rid, path, len(rhead), False)
                    if status >= 200 or status == 101:
                        break
                stats.status(rid, path, status)
                close = False
                if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                    pass
                else:
                    close = forward_body(up, to_client_body, rheaders, "response")
                if "close" in rheaders.get("connection", "").lower() or "close" in headers.get("connection", "").lower():
                    close = True
            finally:
                r = stats.done(rid)
                if r is not None and (verbose or path_kind(path) != "other" or status >= 400):
                    print(f"{rid} {cname} {method} {path} -> {status or 'aborted'} {r['body_bytes']} B in "
                          f"{time.monotonic() - t0:.2f} s", flush=True)
            if close:
                return
    except (OSError, ValueError) as e:
        stats.bump("client_aborts")
        if verbose:
            print(f"- {cname} connection ended: {e}", flush=True)
    finally:
        for s in (client_sock, up.sock if up else None):
            if s is None:
                continue
            try:
                s.close()
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--target", required=True, help="HOST:PORT of the upstream registry")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--stats", help="stats JSON file")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between stats writes (0: on SIGUSR1/exit only)")
    ap.add_argument("--log-max", type=int, default=1000, help="finished requests kept in the stats log")
    ap.add_argument("--verbose", action="store_true", help="print every request and connection end")
    args = ap.parse_args()

    thost, _, tport = args.target.rpartition(":")
    target = (thost or "127.0.0.1", int(tport))
    host, _, port = args.listen.rpartition(":")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host or "127.0.0.1", int(port)))
    srv.listen(128)
    bound = srv.getsockname()[1]
    stats = Stats(args.stats, f"{host or '127.0.0.1'}:{bound}", args.target, args.log_max)
    stats.write()

    def on_usr1(_sig, _frame):
        stats.write()

    def on_exit(_sig, _frame):
        stats.write()
        os._exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_exit)
    signal.signal(signal.SIGINT, on_exit)

    if args.interval > 0:
        def writer():
            while True:
                time.sleep(args.interval)
                try:
                    stats.write()
                except OSError as e:
                    sys.stderr.write(f"counting-proxy: cannot write stats: {e}\n")

        threading.Thread(target=writer, daemon=True).start()

    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{bound}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"counting-proxy 127.0.0.1:{bound} -> {args.target}, stats {args.stats}", flush=True)
    while True:
        try:
            client, addr = srv.accept()
        except InterruptedError:
            continue
        threading.Thread(target=handle, args=(client, addr, target, stats, args.verbose), daemon=True).start()


if __name__ == "__main__":
    main()
