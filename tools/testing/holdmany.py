#!/usr/bin/env python3
"""Many concurrent TCP connections, held (for tools/bench/tunnel-hold).
  holdmany.py serve PORT                  echo server for any number of connections
  holdmany.py hold ADDR PORT N SECONDS    opens N connections (200 at a time, each open once a
                                          first byte came back through it), then
                                          every 5 s sends a byte on each and expects it
                                          back; prints "opened N ok K failed F" at the end
"""
import asyncio, resource, sys, time

def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def serve(port):
    async def echo(r, w):
        try:
            while True:
                d = await r.read(4096)
                if not d: break
                w.write(d); await w.drain()
        except Exception:
            pass
        finally:
            w.close()
    srv = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()

async def hold(addr, port, n, seconds):
    conns, failed = [], 0
    sem = asyncio.Semaphore(200)
    async def open_one():
        nonlocal failed
        async with sem:
            try:
                # Open means working end to end: through a mesh, the local
                # accept comes before the path to the server exists.
                r, w = await asyncio.wait_for(asyncio.open_connection(addr, port), 10)
                w.write(b"x"); await w.drain()
                if await asyncio.wait_for(r.readexactly(1), 30) != b"x": raise OSError("bad echo")
                conns.append((r, w))
            except Exception:
                failed += 1
    await asyncio.gather(*(open_one() for _ in range(n)))
    print("opened %d (failed %d)" % (len(conns), failed), file=sys.stderr, flush=True)
    ok, end = 0, time.time() + seconds
    async def ping(c):
        r, w = c
        try:
            w.write(b"x"); await w.drain()
            return await asyncio.wait_for(r.readexactly(1), 10) == b"x"
        except Exception:
            return False
    alive = list(conns)
    while time.time() < end:
        began = time.time()
        results = await asyncio.gather(*(ping(c) for c in alive))
        ok += sum(results)
        dead = [c for c, good in zip(alive, results) if not good]
        failed += len(dead)
        print("round: %d ok, %d failed, %.2f s" % (sum(results), len(dead), time.time() - began), file=sys.stderr, flush=True)
        alive = [c for c, good in zip(alive, results) if good]
        await asyncio.sleep(5)
    print("opened %d ok %d failed %d held %d" % (len(conns), ok, failed, len(alive)), flush=True)
    for r, w in conns: w.close()

if __name__ == "__main__":
    raise_nofile()
    a = sys.argv[1:]
    if a[0] == "serve": asyncio.run(serve(int(a[1])))
    elif a[0] == "hold": asyncio.run(hold(a[1], int(a[2]), int(a[3]), float(a[4])))
