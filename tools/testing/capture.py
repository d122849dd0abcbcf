#!/usr/bin/env python3
"""Watches one interface (AF_PACKET, in the namespace it runs in) and reports
what crossed it, for Palisade's tests: is it TLS, and did a plaintext needle
ever appear on the wire?

  capture.py IFACE SECONDS NEEDLE
prints "ready", then after SECONDS one JSON line:
  {"tcp_packets": N, "ports": [...], "tls_records": N, "needle_seen": bool}
tls_records counts TCP payloads starting with a TLS record header
(content type 20-23, version 3.x).
"""
import json, socket, struct, sys, time

def main():
    iface, seconds, needle = sys.argv[1], float(sys.argv[2]), sys.argv[3].encode()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.2)
    print("ready", flush=True)
    end = time.time() + seconds
    tcp = tls = 0
    ports = set()
    seen = False
    while time.time() < end:
        try:
            frame = s.recv(65536)
        except socket.timeout:
            continue
        if needle in frame:
            seen = True
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0f) * 4
            proto = frame[14 + 9]
            l4 = 14 + ihl
        elif ethertype == 0x86dd:
            proto = frame[14 + 6]
            l4 = 14 + 40
        else:
            continue
        if proto != 6:
            continue
        tcp += 1
        sport, dport = struct.unpack("!HH", frame[l4:l4 + 4])
        ports.add(min(sport, dport))
        off = (frame[l4 + 12] >> 4) * 4
        payload = frame[l4 + off:]
        if len(payload) >= 5 and 20 <= payload[0] <= 23 and payload[1] == 3:
            tls += 1
    print(json.dumps({"tcp_packets": tcp, "ports": sorted(ports), "tls_records": tls, "needle_seen": seen}), flush=True)

if __name__ == "__main__":
    main()
