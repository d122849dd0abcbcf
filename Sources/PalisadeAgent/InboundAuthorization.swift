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

extension Agent {
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
}
