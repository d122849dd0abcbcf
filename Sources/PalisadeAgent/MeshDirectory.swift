import CPalisadeShared
import Foundation
import Logging
import NIOConcurrencyHelpers
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

/// The directory in force, read by the tunnel's event loops.
final class MeshDirectoryBox: Sendable {
    private let value = NIOLockedValueBox(MeshDirectory())
    var current: MeshDirectory { value.withLockedValue { $0 } }
    func update(_ f: (inout MeshDirectory) -> Void) { value.withLockedValue { f(&$0) } }
}

extension Agent {
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
}
