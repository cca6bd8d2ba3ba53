"""Are the emulated links full duplex? Raw TCP between two rank namespaces over a 0.1 Gbit/s fullmesh link.

Moves 4 MiB one way, then 4 MiB each way at once over the same connection,
three times each, and prints the milliseconds. Needs root (network
namespaces). Used in docs/BENCHMARKS.md to tell the links from gloo.

    python benchmarks/duplex_tcp.py
"""
import subprocess, sys, time
from tokenring.tools.netem import Network, _rank_address

SIZE = 4 << 20
SERVER = r'''
import socket, sys, threading
size = int(sys.argv[1]); nconn = int(sys.argv[2]); both = sys.argv[3] == "both"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((sys.argv[4], 5555)); srv.listen(4)
conns = [srv.accept()[0] for _ in range(nconn)]
recv_conn, send_conn = conns[0], conns[-1]
def recv_all():
    got = 0
    while got < size:
        got += len(recv_conn.recv(1 << 20))
for _ in range(3):
    threads = [threading.Thread(target=recv_all)]
    if both:
        threads.append(threading.Thread(target=lambda: send_conn.sendall(b"y" * size)))
    [t.start() for t in threads]; [t.join() for t in threads]
    recv_conn.sendall(b"k")
'''
CLIENT = r'''
import socket, sys, threading, time
size = int(sys.argv[1]); nconn = int(sys.argv[2]); both = sys.argv[3] == "both"
conns = [socket.create_connection((sys.argv[4], 5555)) for _ in range(nconn)]
send_conn, recv_conn = conns[0], conns[-1]
def recv_all():
    got = 0
    while got < size:
        got += len(recv_conn.recv(1 << 20))
times = []
for _ in range(3):
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda: send_conn.sendall(b"x" * size))]
    if both:
        threads.append(threading.Thread(target=recv_all))
    [t.start() for t in threads]; [t.join() for t in threads]
    send_conn.recv(1)
    times.append(round((time.perf_counter() - t0) * 1e3))
print(sys.argv[3], nconn, "connection(s):", times, "ms")
'''
with Network("fullmesh", 2, 0.1) as net:
    addr = _rank_address("fullmesh", 1)
    for nconn, mode in ((1, "one"), (1, "both")):
        server = subprocess.Popen(["ip", "netns", "exec", net.namespaces[1], sys.executable, "-c", SERVER, str(SIZE), str(nconn), mode, addr])
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", net.namespaces[0], sys.executable, "-c", CLIENT, str(SIZE), str(nconn), mode, addr],
                             capture_output=True, text=True, timeout=60)
        print(out.stdout.strip(), out.stderr.strip()[-300:])
        server.wait(timeout=30)
