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
