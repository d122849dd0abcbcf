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

/// What the tunnel's event loops need from the reconcile loop, published as
/// one immutable snapshot after every change (workloads, policy, SVIDs).
struct MeshDirectory: @unchecked Sendable {  // immutable snapshots; CompiledLookup is read-only
    /// Remote workload address -> the node whose agent delivers to it.
    var remoteEndpoints: [IPAddress: TunnelPeer] = [:]
    /// Local workload address -> its identity (tunnel destinations).
    var localEndpoints: [IPAddress: NumericIdentity] = [:]
    var identityBySpiffeID: [SpiffeID: NumericIdentity] = [:]
    var spiffeIDByIdentity: [UInt32: SpiffeID] = [:]
    var credentials: [SpiffeID: ClientCredentials] = [:]
    var lookup: CompiledLookup?
    /// Global services by virtual IP.
    var services: [IPAddress: ServiceRoute] = [:]
    /// L7 rules, and the labels/namespace of local workloads they select on.
    var http = HTTPRuleSet([])
    /// Verifies bearer tokens against the configured JWT issuers (nil: none).
    var verifyBearer: BearerVerifier?
    var localWorkloads: [IPAddress: (labels: [String: String], namespace: String)] = [:]
    /// Other nodes' workload addresses -> identity (to check a tunnel's
    /// claim of where a request came from).
    var remoteIdentities: [IPAddress: NumericIdentity] = [:]
    /// The tunnel addresses of the nodes each remote workload is registered
    /// on: a stream from anywhere else with that SVID is a stolen one.
    var registeredNodeAddresses: [SpiffeID: Set<IPAddress>] = [:]
    var trustDomain = ""

    /// The HTTP gate for requests from `source` to this node's workload at
    /// `address`:`port`, if that port has L7 rules.
    func httpGate(address: IPAddress, port: Int, source: SpiffeID, caller: IPAddress?) -> OutboundRoute.HTTP? {
        guard let w = localWorkloads[address], let rules = http.destination(labels: w.labels, namespace: w.namespace, port: port) else { return nil }
        let destination = localEndpoints[address].flatMap { spiffeIDByIdentity[$0.rawValue]?.description } ?? "\(address):\(port)"
        // Rules on JWT identities without a configured issuer: every token
        // counts as unverified (deny rules on JWT identities apply to it).
        let verify: BearerVerifier? = rules.usesJWT ? (verifyBearer ?? { _, loop in loop.makeSucceededFuture(nil) }) : nil
        let appProtocol: L7AppProtocol = switch rules.appProtocol { case .h2c: .http2; case .http: .http1; case nil: .detect }
        return OutboundRoute.HTTP(destination: destination, usesHeaders: rules.usesHeaders, verifyBearer: verify, appProtocol: appProtocol) { method, uri, host, headers, jwt in
            let d = rules.decide(HTTPRequestFacts(source: source, jwtIdentity: jwt, sourceAddress: caller, method: method, path: uri,
                                                  host: host, headers: headers))
            return HTTPVerdict(allowed: d.allowed, reason: d.reason, rule: d.rule)
        }
    }
}

/// A global service's endpoints, with how close each one is to this node.
struct ServiceRoute: Sendable {
    struct Endpoint: Sendable {
        var peer: TunnelPeer?     // nil: on this node
        var address: IPAddress
        var distance: Int         // 0 this node, 1 zone, 2 region, 3 cloud, 4 elsewhere
    }
    var name: String
    var port: Int
    var endpoints: [Endpoint]
}

final class MeshDirectoryBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value = MeshDirectory()
    var current: MeshDirectory { lock.lock(); defer { lock.unlock() }; return value }
    func update(_ f: (inout MeshDirectory) -> Void) { lock.lock(); f(&value); lock.unlock() }
}

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
        proxy.accessLog = { [weak self] entry in self?.listener?.accessLog?(entry) }
        outbound = proxy
        log.info("outbound listener", metadata: ["port": "\(proxy.localPort)", "redirects": "connect4/connect6 of enrolled workloads"])
    }

    /// Where a redirected connection goes: the kernel's record says who
    /// opened it (from its cgroup) and where it was going; the directory
    /// says which node serves that address and which SVID to present.
    static func route(_ c: AcceptedConnection, table: RedirectTable, directory: MeshDirectory, outliers: OutlierDetector) -> OutboundRoute? {
        guard let origin = table.take(c) else { return nil }
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
            route.caller = IPAddress(bytes16: c.client).description
            return route
        }
        // A workload of this node whose port has HTTP rules (the kernel
        // redirects those too): the proxy here judges each request. A
        // connection the L3/L4 policy refuses is reset at once.
        let port = Int(UInt16(bigEndian: origin.port))
        if directory.remoteEndpoints[dst] == nil, let local = directory.localEndpoints[dst],
           let source = directory.spiffeIDByIdentity[origin.identity], let creds = directory.credentials[source],
           let http = directory.httpGate(address: dst, port: port, source: source, caller: IPAddress(bytes16: c.client)) {
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
        route.caller = IPAddress(bytes16: c.client).description
        return route
    }

    /// The receiving side: the destination must be a workload of this node,
    /// and the authenticated source's identity must be allowed in by policy
    /// (the kernel checks again on the delivered connection, by its mark).
    static func authorizeInbound(_ r: InboundRequest, directory: MeshDirectory) -> InboundDecision {
        guard let dst = IPAddress(r.host), let local = directory.localEndpoints[dst] else {
            return .refuse(status: 404, reason: "no such workload on this node")
        }
        if let refusal = checkSendingNode(r, directory: directory) { return refusal }
        let source = directory.identityBySpiffeID[r.peer] ?? .unknown
        if let lookup = directory.lookup {
            let d = lookup.evaluate(local: local, direction: .ingress, peer: source, cidrPeer: nil, proto: 6, port: UInt16(r.port))
            if d.verdict == .deny { return .refuse(status: 403, reason: "denied by policy") }
        }
        let mark = PAL_MARK_MAGIC | (source.rawValue & PAL_MARK_IDENTITY)
        // The sending agent's word for the caller's address counts only if
        // that address is a workload of the authenticated identity.
        let caller = r.caller.flatMap(IPAddress.init).flatMap { a in directory.remoteIdentities[a] == source ? a : nil }
        if let http = directory.httpGate(address: dst, port: r.port, source: r.peer, caller: caller) {
            return .deliverHTTP(mark: mark, destination: http.destination, usesHeaders: http.usesHeaders, verifyBearer: http.verifyBearer,
                                appProtocol: http.appProtocol, gate: http.gate)
        }
        return .deliver(mark: mark)
    }

    /// Defence in depth against a workload SVID (and key) stolen from the
    /// node it was issued to: the tunnel connection must come from the node
    /// the workload is registered on (by its tunnel address, as the store or
    /// the configuration lists it). A peer of this trust domain that no node
    /// lists is refused too; a federated domain's workloads are checked when
    /// they are listed. (Nodes behind NAT must advertise the address their
    /// peers see.)
    static func checkSendingNode(_ r: InboundRequest, directory: MeshDirectory) -> InboundDecision? {
        // (A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.)
        guard let source = r.sourceAddress.flatMap(IPAddressText.normalize).flatMap(IPAddress.init) else { return nil }
        if let nodes = directory.registeredNodeAddresses[r.peer] {
            return nodes.contains(source) ? nil
                : .refuse(status: 403, reason: "\(r.peer) is not registered on the node this tunnel comes from (\(source))")
        }
        return r.peer.trustDomain == directory.trustDomain
            ? .refuse(status: 403, reason: "\(r.peer) is not registered on any node") : nil
    }

    /// Nodes publish their trust domain's bundle (for federation) only when
    /// they are its CA and the store lets anyone write: with an issuer, or
    /// with etcd authentication on, bundles are the operator's to publish.
    var publishesBundle: Bool { config.issuer == nil && config.store?.user == nil }

    /// Publishes what the tunnel needs after a reconcile or a rotation.
    func publishDirectory(universe: Universe, compiled: CompiledPolicy?) {
        var remote: [IPAddress: TunnelPeer] = [:]
        var registered: [SpiffeID: Set<IPAddress>] = [:]
        let nodes = Dictionary(meshNodes.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for w in meshRemoteWorkloads {
            guard let n = nodes[w.node] else { continue }
            if let a = IPAddress(n.tunnelHost) { registered[w.spiffeID, default: []].insert(a) }
            for a in w.addresses {
                remote[a] = TunnelPeer(host: n.tunnelHost, port: n.tunnelPort, trustDomain: n.trustDomain, expectedIdentity: n.spiffeID)
            }
        }
        var local: [IPAddress: NumericIdentity] = [:]
        var bySpiffe: [SpiffeID: NumericIdentity] = [:]
        var byID: [UInt32: SpiffeID] = [:]
        for (id, w) in universe.workloads {
            bySpiffe[w.spiffeID] = id
            byID[id.rawValue] = w.spiffeID
            for a in w.addresses where !w.remoteAddresses.contains(a) { local[a] = id }
        }
        let services = serviceRoutes(universe: universe, remote: remote, nodes: nodes)
        var remoteIdentities: [IPAddress: NumericIdentity] = [:]
        for (id, w) in universe.workloads { for a in w.remoteAddresses { remoteIdentities[a] = id } }
        var workloadsByAddress: [IPAddress: (labels: [String: String], namespace: String)] = [:]
        for w in universe.workloads.values { for a in w.addresses where !w.remoteAddresses.contains(a) { workloadsByAddress[a] = (w.labels, w.namespace) } }
        let http = lastGoodHTTP
        directory.update { d in
            d.services = services
            d.http = http
            d.localWorkloads = workloadsByAddress
            d.remoteIdentities = remoteIdentities
            d.registeredNodeAddresses = registered
            d.trustDomain = config.trustDomain
            d.remoteEndpoints = remote
            d.localEndpoints = local
            d.identityBySpiffeID = bySpiffe
            d.spiffeIDByIdentity = byID
            if let compiled { d.lookup = CompiledLookup(compiled) }
        }
    }

    /// Tells the kernel which local workload ports have HTTP rules: enrolled
    /// callers on this node are redirected to the proxy for them, and
    /// connections that did not come through an agent are refused.
    func syncL7Ports(universe: Universe) {
        var wanted = Set<Datapath.L7Port>()
        for (id, w) in universe.workloads where localSpiffeIDs.contains(w.spiffeID) {
            for p in lastGoodHTTP.ports(labels: w.labels, namespace: w.namespace) { wanted.insert(.init(identity: id, port: UInt16(p))) }
        }
        do {
            try datapath.setL7Ports(wanted)
        } catch {
            log.error("L7 ports not updated", metadata: ["error": "\(error)"])
        }
    }

    func publishCredentials() {
        var creds: [SpiffeID: ClientCredentials] = [:]
        for id in localSpiffeIDs {
            if let i = svids.cached(id) {
                creds[id] = ClientCredentials(spiffeID: id, serial: i.serial, certificateFile: i.certificateFile, keyFile: i.keyFile)
            }
        }
        directory.update { $0.credentials = creds }
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

extension Agent {
    /// Nodes and remote workloads: the configuration's first, then what the
    /// other nodes published in the store (the last known copy while the
    /// store is unreachable).
    func mergeStorePeers() {
        var nodes = config.nodes
        var remote = config.remoteWorkloads
        var services = config.services
        if let sync = storeSync {
            let vips = Set(services.map(\.vip))
            services += sync.services().filter { !vips.contains($0.vip) }
            let (n, w) = sync.peers()
            let known = Set(nodes.map(\.name))
            for r in n where !known.contains(r.name) {
                guard let address = HostPort(r.tunnelAddress) else { continue }
                var m = MeshNode(name: r.name, tunnelHost: address.host, tunnelPort: address.port, trustDomain: r.trustDomain, spiffeID: try? SpiffeID(r.spiffeID))
                m.locality = r.locality ?? Locality()
                nodes.append(m)
            }
            let names = Set(remote.map { "\($0.node)/\($0.name)" })
            for r in w where !names.contains("\(r.node)/\(r.name)") {
                guard let id = try? SpiffeID(r.spiffeID) else { continue }
                var rw = RemoteWorkload(name: r.name, spiffeID: id, namespace: r.namespace, labels: r.labels,
                                        namespaceLabels: r.namespaceLabels, addresses: r.addresses.compactMap(IPAddress.init), node: r.node)
                rw.ports = (r.ports ?? []).compactMap(NamedPort.init)
                remote.append(rw)
            }
            let st = sync.status
            state.store = .init(connected: st.connected, revision: st.revision, lastError: st.error, peers: n.count)
            metrics.setStoreConnected(st.connected)
        }
        // Revoked nodes: configured ones are dropped too, and connections
        // from their addresses are cut (new streams are refused anyway: none
        // of their workloads is registered any more).
        let revoked = storeSync?.revoked() ?? []
        if !revoked.isEmpty {
            let names = Set(revoked.map(\.node))
            nodes.removeAll { names.contains($0.name) }
            let addresses = Set(revoked.compactMap { $0.tunnelAddress.flatMap { HostPort($0)?.host } })
            if let cut = listener?.closeConnections(from: addresses), cut > 0 {
                log.warning("tunnel connections from revoked nodes closed", metadata: ["connections": "\(cut)", "nodes": "\(names.sorted())"])
            }
        }
        // A remote workload whose node is unknown cannot be reached.
        let nodeNames = Set(nodes.map(\.name))
        meshNodes = nodes
        meshRemoteWorkloads = remote.filter { nodeNames.contains($0.node) }
        meshServices = services
    }

    /// Tells the store about this node and its workloads.
    func publishToStore(_ workloads: [Workload]) {
        guard let sync = storeSync, let advertise = config.advertiseAddress else { return }
        let node = NodeRecord(name: sync.node, tunnelAddress: advertise, trustDomain: config.trustDomain, spiffeID: config.nodeSpiffeID.description,
                              locality: config.locality,
                              trusts: trust.current.bundles.mapValues { $0.map(\.serialNumber.description).sorted() })
        let records = workloads.map {
            var ns = $0.namespaceLabels
            ns["kubernetes.io/metadata.name"] = $0.namespace
            return WorkloadRecord(name: $0.name, node: sync.node, spiffeID: $0.spiffeID.description, namespace: $0.namespace,
                                  labels: $0.labels, namespaceLabels: ns, addresses: $0.addresses.map(\.description),
                                  ports: $0.ports.isEmpty ? nil : $0.ports.map(\.description))
        }
        sync.publish(node: node, workloads: records, bundlePEM: publishesBundle ? signer.bundle.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") : nil)
    }
}

extension Agent {
    /// Locality distance from this node to a node (0 = this node).
    func distance(to node: MeshNode?) -> Int {
        guard let node else { return 0 }
        let me = config.locality
        if let z = me.zone, z == node.locality.zone { return 1 }
        if let r = me.region, r == node.locality.region { return 2 }
        if let c = me.cloud, c == node.locality.cloud { return 3 }
        return 4
    }

    /// Endpoints of every global service: the workloads, here and on other
    /// nodes, whose labels match its selector.
    func serviceRoutes(universe: Universe, remote: [IPAddress: TunnelPeer], nodes: [String: MeshNode]) -> [IPAddress: ServiceRoute] {
        var out: [IPAddress: ServiceRoute] = [:]
        let remoteNodeOf = Dictionary(meshRemoteWorkloads.flatMap { w in w.addresses.map { ($0, w.node) } }, uniquingKeysWith: { a, _ in a })
        for s in meshServices {
            var endpoints: [ServiceRoute.Endpoint] = []
            for w in universe.workloads.values where s.selector.allSatisfy({ w.labels[$0.key] == $0.value }) {
                for a in w.addresses where a.isV4 == s.vip.isV4 {
                    if w.remoteAddresses.contains(a) {
                        guard let peer = remote[a] else { continue }
                        endpoints.append(.init(peer: peer, address: a, distance: distance(to: remoteNodeOf[a].flatMap { nodes[$0] })))
                    } else {
                        endpoints.append(.init(peer: nil, address: a, distance: 0))
                    }
                }
            }
            if !endpoints.isEmpty { out[s.vip] = ServiceRoute(name: s.name, port: s.port, endpoints: endpoints) }
        }
        return out
    }
}

/// The trust bundles in force, read by the tunnel's event loops.
final class TrustBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value = SPIFFEVerifier(bundles: [:])
    private var fingerprint = ""
    var current: SPIFFEVerifier { lock.withLock { value } }
    /// Returns true if the bundles changed.
    @discardableResult
    func set(_ v: SPIFFEVerifier) -> Bool {
        let fp = v.fingerprint
        return lock.withLock {
            guard fp != fingerprint else { return false }
            value = v
            fingerprint = fp
            return true
        }
    }
}

extension Agent {
    /// Re-reads the trust bundles; a change reaches the listener and pools.
    func refreshTrust() {
        do {
            if trust.set(try verifier()) {
                try listener?.updateVerifier(trust.current)
                log.info("trust bundles", metadata: ["trust-domains": "\(trust.current.bundles.keys.sorted().joined(separator: ","))"])
            }
        } catch {
            log.error("trust bundles not updated", metadata: ["error": "\(error)"])
        }
    }
}
