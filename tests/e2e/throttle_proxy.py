#!/usr/bin/python3
"""Rate-limiting TCP proxy for the Shoal e2e tests (stdlib only).

Forwards every connection accepted on --listen to --target, limiting the bytes sent back to the
client (target -> client) to --rate bytes per second per connection. Used to slow an upstream
registry down so a test can kill shoal while it is in the middle of fetching a blob.

  throttle_proxy.py --target 127.0.0.1:5000 --rate 16777216 --port-file /tmp/x/port
"""

import argparse
import os
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def pump(src, dst, rate):
    start = time.monotonic()
    sent = 0
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
            sent += len(data)
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def handle(client, target, rate):
    try:
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
    except OSError as e:
        sys.stderr.write(f"throttle-proxy: cannot connect to {target}: {e}\n")
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(target=pump, args=(client, upstream, 0), daemon=True)
    down = threading.Thread(target=pump, args=(upstream, client, rate), daemon=True)
    up.start()
    down.start()
    up.join()
    down.join()
    client.close()
    upstream.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--rate", type=int, default=16 << 20, help="bytes/second per connection (0 = unlimited)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args()

    thost, _, tport = args.target.rpartition(":")
    target = (thost, int(tport))
    host, _, port = args.listen.rpartition(":")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host or "127.0.0.1", int(port)))
    srv.listen(64)
    bound = srv.getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{bound}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"throttle-proxy 127.0.0.1:{bound} -> {args.target} at {args.rate} B/s", flush=True)
    while True:
        client, _ = srv.accept()
        threading.Thread(target=handle, args=(client, target, args.rate), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
