import CPalisadeShared
import Foundation
import Logging
import NIOCore
import NIOPosix
import PalisadeCA
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy
import PalisadeL7
import PalisadeTunnel

/// The kernel's redirect records, read from the tunnel's event loop.
struct RedirectTable: @unchecked Sendable {
    let datapath: Datapath
    func take(_ c: AcceptedConnection) -> pal_redirect_origin? {
        datapath.takeRedirect(client: IPAddress(bytes16: c.client), clientPort: c.clientPort,
                              agent: IPAddress(bytes16: c.local), agentPort: c.localPort)
    }
}

extension Agent {
    /// Starts the outbound listener and the tunnel pool (one event loop).
    func startMesh() throws {
        guard let port = config.outboundPort else { return }
        let directory = self.directory, log = self.log
        let table = RedirectTable(datapath: datapath)
        let trust = self.trust
        let outliers = OutlierDetector()
        let proxy = try OutboundProxy(port: port, group: meshGroup, makePool: { TunnelPool(eventLoop: $0, verifier: { trust.current }) },
                                      outliers: outliers) { accepted in
            Agent.route(accepted, table: table, directory: directory.current, outliers: outliers)
        }
        let metrics = self.metrics
        proxy.onOutcome = { (outcome: OutboundOutcome) in
            metrics.recordTunnelConnection(ok: outcome.error == nil)
            if let e = outcome.error {
                log.warning("outbound connection refused", metadata: [
                    "destination": "\(outcome.route?.authority ?? "?")", "source": "\(outcome.route?.credentials.spiffeID.description ?? "?")",
                    "tried": "\(outcome.route?.candidates.map(\.key).joined(separator: ",") ?? "?")", "error": "\(e)"])
            }
        }
        proxy.accessLog = accessLogSink()
        outbound = proxy
        log.info("outbound listener", metadata: ["port": "\(proxy.localPort)", "redirects": "connect4/connect6 of enrolled workloads"])
    }

    /// Where a redirected connection goes: the kernel's record says who
    /// opened it (from its cgroup) and where it was going; the directory
    /// says which node serves that address and which SVID to present.
    static func route(_ c: AcceptedConnection, table: RedirectTable, directory: MeshDirectory, outliers: OutlierDetector) -> OutboundRoute? {
        guard let origin = table.take(c) else { return nil }
        return route(origin: origin, client: IPAddress(bytes16: c.client), directory: directory, outliers: outliers)
    }

    /// The same decision from the kernel's record and the caller's address
    /// (what the unit tests feed it).
    static func route(origin: pal_redirect_origin, client: IPAddress, directory: MeshDirectory, outliers: OutlierDetector) -> OutboundRoute? {
        let dst = IPAddress(tuple: origin.addr)
        let mark = PAL_MARK_MAGIC | (origin.identity & PAL_MARK_IDENTITY)
        if let service = directory.services[dst] {
            // A global service: nearest healthy endpoints first; ejected ones
            // last (still tried: better a retry than a refusal).
            guard Int(UInt16(bigEndian: origin.port)) == service.port, let source = directory.spiffeIDByIdentity[origin.identity],
                  let creds = directory.credentials[source] else { return nil }
            let candidates = service.endpoints.map { e in
                OutboundRoute.Candidate(peer: e.peer, host: e.address.description, port: service.port)
            }
            let ranked = zip(service.endpoints, candidates).sorted { a, b in
                let ea = outliers.isEjected(a.1.key), eb = outliers.isEjected(b.1.key)
                if ea != eb { return !ea }
                return (a.0.distance, a.0.address) < (b.0.distance, b.0.address)
            }.map(\.1)
            var route = OutboundRoute(credentials: creds, candidates: ranked, mark: mark)
            route.caller = client.description
            return route
        }
        // A workload of this node whose port has HTTP rules (the kernel
        // redirects those too): the proxy here judges each request. A
        // connection the L3/L4 policy refuses is reset at once.
        let port = Int(UInt16(bigEndian: origin.port))
        if directory.remoteEndpoints[dst] == nil, let local = directory.localEndpoints[dst],
           let source = directory.spiffeIDByIdentity[origin.identity], let creds = directory.credentials[source],
           let http = directory.httpGate(address: dst, port: port, source: source, caller: client) {
            if let lookup = directory.lookup,
               lookup.evaluate(local: local, direction: .ingress, peer: NumericIdentity(origin.identity), cidrPeer: nil, proto: 6, port: UInt16(port)).verdict == .deny {
                return nil
            }
            return OutboundRoute(credentials: creds, candidates: [.init(peer: nil, host: dst.description, port: port)], mark: mark, http: http)
        }
        guard let peer = directory.remoteEndpoints[dst],
              let source = directory.spiffeIDByIdentity[origin.identity],
              let creds = directory.credentials[source] else { return nil }
        let host = dst.isV4 ? dst.description : "[\(dst)]"
        var route = OutboundRoute(peer: peer, credentials: creds, authority: "\(host):\(port)")
        route.caller = client.description
        return route
    }

    /// Where a workload reaches the outbound listener: the node side of a
    /// pod's veth, or loopback for processes sharing the node's network.
    func outboundListener(for w: Workload, port: Int) -> Datapath.OutboundListener? {
        let v4Loopback = IPAddress.v4(127, 0, 0, 1), v6Loopback = IPAddress("::1")!
        switch w.attachment {
        case .cgroup:
            return .init(ipv4: v4Loopback, ipv6: v6Loopback, port: UInt16(port))
        case .pod(let ifname):
            let addrs = HostAddresses.discover(interface: ifname)
            guard let v4 = addrs.first(where: \.isV4) else { return nil }
            return .init(ipv4: v4, ipv6: addrs.first { !$0.isV4 } ?? v4, port: UInt16(port))
        }
    }
}
