#!/usr/bin/python3
"""TCP relay adding a fixed one-way delay in each direction (stdlib only; the kernel here has no
netem). shoal-cluster runs it in the registry namespace for --upstream-delay-ms, in front of
docker-registry:

  delay_relay.py --listen 0.0.0.0:5000 --target 127.0.0.1:5001 --delay-ms 40

Every piece read from one side is written to the other side DELAY ms after it was read, so a
request/response exchange gains 2 x DELAY of round-trip time, like a WAN path. Per direction,
at most --window bytes are held in flight (read but not yet written): the reader stops reading
until the writer catches up, so the sender's TCP sees back-pressure, and throughput per
connection is bounded by window / delay as over a real long path (default 4 MiB: 4 MiB / 40 ms
= 100 MiB/s). One thread per direction per connection.
"""

import argparse
import collections
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


class Pipe:
    """One direction: a reader thread queues (due, data); a writer thread sends each at its due time."""

    def __init__(self, src, dst, delay, window):
        self.src, self.dst, self.delay, self.window = src, dst, delay, window
        self.q = collections.deque()
        self.held = 0
        self.eof = False
        self.cv = threading.Condition()

    def read_loop(self):
        try:
            while True:
                with self.cv:
                    while self.held >= self.window:
                        self.cv.wait()
                data = self.src.recv(CHUNK)
                with self.cv:
                    if not data:
                        break
                    self.q.append((time.monotonic() + self.delay, data))
                    self.held += len(data)
                    self.cv.notify_all()
        except OSError:
            pass
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def write_loop(self):
        try:
            while True:
                with self.cv:
                    while not self.q and not self.eof:
                        self.cv.wait()
                    if not self.q and self.eof:
                        break
                    due, data = self.q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
                with self.cv:
                    self.q.popleft()
                    self.held -= len(data)
                    self.cv.notify_all()
            # the delayed EOF: half-close towards the destination
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            # the destination went away: stop reading too
            for s in (self.src, self.dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.cv:
                self.eof = True
                self.held = 0
                self.cv.notify_all()


def handle(client, target, delay, window):
    try:
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pipes = [Pipe(client, upstream, delay, window), Pipe(upstream, client, delay, window)]
    threads = []
    for p in pipes:
        for fn in (p.read_loop, p.write_loop):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    client.close()
    upstream.close()


def hostport(s):
    h, p = s.rsplit(":", 1)
    return h, int(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, type=hostport)
    ap.add_argument("--target", required=True, type=hostport)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--window", type=int, default=4 << 20, help="bytes in flight per direction")
    a = ap.parse_args()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(a.listen)
    srv.listen(256)
    print(f"delay relay {a.listen[0]}:{a.listen[1]} -> {a.target[0]}:{a.target[1]}, "
          f"{a.delay_ms} ms each way", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c, a.target, a.delay_ms / 1000.0, a.window), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
