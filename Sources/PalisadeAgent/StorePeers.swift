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
    /// Nodes publish their trust domain's bundle (for federation) only when
    /// they are its CA and the store lets anyone write: with an issuer, or
    /// with etcd authentication on, bundles are the operator's to publish.
    var publishesBundle: Bool { config.issuer == nil && config.store?.user == nil }

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
            if let cut = inbound?.closeConnections(from: addresses), cut > 0 {
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
            let ns = Self.namespaceLabels($0.namespaceLabels, of: $0.namespace)
            return WorkloadRecord(name: $0.name, node: sync.node, spiffeID: $0.spiffeID.description, namespace: $0.namespace,
                                  labels: $0.labels, namespaceLabels: ns, addresses: $0.addresses.map(\.description),
                                  ports: $0.ports.isEmpty ? nil : $0.ports.map(\.description))
        }
        sync.publish(node: node, workloads: records, bundlePEM: publishesBundle ? signer.bundle.compactMap { try? $0.serializeAsPEM().pemString }.joined(separator: "\n") : nil)
    }

    /// A namespace's labels with the one Kubernetes always sets (policies
    /// select namespaces by it).
    static func namespaceLabels(_ labels: [String: String], of namespace: String) -> [String: String] {
        var all = labels
        all["kubernetes.io/metadata.name"] = namespace
        return all
    }
}
