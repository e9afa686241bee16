#!/usr/bin/env python3
"""Opens many client connections to a proxy and holds them idle, for
benches/load.sh's idle-memory measurement. Standard library only.

Driven line by line over stdin/stdout, so that the caller can read the
proxy's memory between the phases:

  1. opens --count connections (with --tls: completes each TLS handshake),
     at most --connect-concurrency at a time, then prints
         connected OK FAILED
  2. waits for a line on stdin: "request" or "done"
  3. on "request": sends one "GET / HTTP/1.1" on every connection (at most
     --request-concurrency at a time), reads each whole answer, then prints
         requested OK FAILED
     (OK counts 2xx answers) and waits for "done"
  4. on "done": prints
         held N
     the connections the proxy had not closed, and exits, closing them all.

Every wait is bounded by --deadline seconds from the start; past it the
script prints "error deadline" and exits 3. It raises its own open-files
limit as needed. Exit 0 when it ran to the end (the counts say how well).
"""

import argparse
import asyncio
import resource
import ssl
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--tls", action="store_true", help="TLS 1.3, certificate not verified")
    p.add_argument("--connect-concurrency", type=int, default=100)
    p.add_argument("--request-concurrency", type=int, default=8)
    p.add_argument("--io-timeout", type=float, default=10.0, help="per connect/handshake/answer")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    return p.parse_args()


def raise_nofile(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else max(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        # Not root: go as high as the hard limit allows.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Conn:
    __slots__ = ("reader", "writer", "closed", "watch")

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.watch = None


async def read_answer(reader):
    """Reads one HTTP/1.1 answer; returns its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def watch(conn):
    """Marks the connection closed when the proxy closes it (or sends bytes)."""
    try:
        await conn.reader.read(1)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    conn.closed = True


async def main(args):
    raise_nofile(args.count + 256)
    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.set_alpn_protocols(["http/1.1"])

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    conns = []
    failed = 0
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def connect():
        nonlocal failed
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port, ssl=context,
                                            server_hostname="localhost" if context else None),
                    args.io_timeout)
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                failed += 1
                return
            conns.append(Conn(reader, writer))

    await asyncio.gather(*(connect() for _ in range(args.count)))
    say(f"connected {len(conns)} {failed}")

    command = (await stdin.readline()).decode().strip()
    if command == "request":
        ok = 0
        bad = 0
        gate = asyncio.Semaphore(args.request_concurrency)

        async def request(conn):
            nonlocal ok, bad
            async with gate:
                try:
                    conn.writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: hold_conns\r\n\r\n")
                    await conn.writer.drain()
                    status = await asyncio.wait_for(read_answer(conn.reader), args.io_timeout)
                except (OSError, ssl.SSLError, ValueError, IndexError,
                        asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                    conn.closed = True
                    bad += 1
                    return
                if 200 <= status < 300:
                    ok += 1
                else:
                    bad += 1

        await asyncio.gather(*(request(c) for c in conns))
        say(f"requested {ok} {bad}")
        command = (await stdin.readline()).decode().strip()
    if command != "done":
        say(f"error unexpected command {command!r}")
        return 2

    # Give every watcher a turn to notice a connection the proxy has closed.
    for conn in conns:
        if not conn.closed:
            conn.watch = asyncio.ensure_future(watch(conn))
    await asyncio.sleep(0.2)
    say(f"held {sum(1 for c in conns if not c.closed)}")
    for conn in conns:
        if conn.watch is not None:
            conn.watch.cancel()
        conn.writer.transport.abort()
    return 0


def run():
    args = parse_args()
    try:
        return asyncio.run(asyncio.wait_for(main(args), args.deadline))
    except asyncio.TimeoutError:
        say("error deadline")
        return 3


if __name__ == "__main__":
    sys.exit(run())
