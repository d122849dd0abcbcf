import PalisadeIdentity

/// Kubernetes NetworkPolicy (networking.k8s.io/v1) read into Palisade's
/// model with Kubernetes' semantics: a pod is isolated for a direction when a
/// policy of that type selects it; allowed peers are the union of every rule;
/// an empty `from`/`to` allows all peers and empty `ports` all ports; within
/// one peer entry podSelector and namespaceSelector are ANDed; podSelector
/// alone means the policy's own namespace.
///
/// Named ports resolve on the workloads' declared `ports` (ingress: the
/// selected workload's; egress: the peer's). Not supported, and rejected
/// with an error rather than ignored: SCTP.
enum KubernetesImport {
    static let apiVersion = "networking.k8s.io/v1"

    static func parse(_ doc: YAMLValue) throws -> Policy {
        let top = try doc.mapping(allowedKeys: ["apiVersion", "kind", "metadata", "spec", "status"])
        guard let metaNode = top["metadata"] else { throw doc.error("missing field 'metadata'") }
        let meta = try metaNode.mapping()
        guard let nameNode = meta["name"] else { throw metaNode.error("missing field 'name'") }
        let name = try nameNode.string()
        let namespace = try meta["namespace"].map { try $0.string() } ?? "default"
        for (what, v, node) in [("name", name, nameNode), ("namespace", namespace, meta["namespace"] ?? metaNode)]
            where !PolicyParser.isDNSLabelish(v) {
            throw node.error("expected a Kubernetes \(what) (lowercase letters, digits, '-', '.'), got '\(v)'")
        }
        guard let specNode = top["spec"] else { throw doc.error("missing field 'spec'") }
        let spec = try specNode.mapping(allowedKeys: ["podSelector", "policyTypes", "ingress", "egress"])
        guard let podSel = spec["podSelector"] else {
            throw specNode.error("missing field 'podSelector' (use 'podSelector: {}' to select every pod in the namespace)")
        }
        var selector = WorkloadSelector(labels: try labelSelector(podSel), namespace: namespace)
        selector.namespaceLabels = nil

        var types: Set<String> = ["Ingress"]
        if spec["egress"] != nil { types.insert("Egress") }
        if let t = spec["policyTypes"] {
            types = []
            for v in try t.sequence() {
                let s = try v.string()
                guard s == "Ingress" || s == "Egress" else { throw v.error("expected Ingress or Egress, got '\(s)'") }
                types.insert(s)
            }
        }
        let ingress = types.contains("Ingress") ? try rules(spec["ingress"], peerKey: "from", namespace: namespace) : nil
        let egress = types.contains("Egress") ? try rules(spec["egress"], peerKey: "to", namespace: namespace) : nil
        return Policy(name: "\(namespace).\(name)", mode: .enforce, selector: selector, ingress: ingress, egress: egress, location: doc.location)
    }

    static func labelSelector(_ v: YAMLValue) throws -> LabelSelector {
        if v.isNull { return LabelSelector() }
        let m = try v.mapping(allowedKeys: ["matchLabels", "matchExpressions"])
        var s = LabelSelector()
        if let l = m["matchLabels"] { s.matchLabels = try PolicyParser.labels(l) }
        if let e = m["matchExpressions"] { s.matchExpressions = try PolicyParser.expressions(e) }
        return s
    }

    static func rules(_ v: YAMLValue?, peerKey: String, namespace: String) throws -> [Rule] {
        guard let v, !v.isNull else { return [] }
        return try v.sequence().map { r in
            let m = r.isNull ? [:] : try r.mapping(allowedKeys: [peerKey, "ports"])
            let peers = try m[peerKey].map { p in p.isNull ? [] : try p.sequence().map { try peer($0, namespace: namespace) } } ?? []
            let ports = try m["ports"].map { p in p.isNull ? [] : try p.sequence().map(port) } ?? []
            return Rule(action: .allow, peers: peers, ports: ports, location: r.location)
        }
    }

    static func peer(_ v: YAMLValue, namespace: String) throws -> Peer {
        let m = try v.mapping(allowedKeys: ["podSelector", "namespaceSelector", "ipBlock"])
        if let ip = m["ipBlock"] {
            guard m.count == 1 else { throw v.error("ipBlock cannot be combined with podSelector or namespaceSelector in one peer") }
            let b = try ip.mapping(allowedKeys: ["cidr", "except"])
            guard let c = b["cidr"] else { throw ip.error("missing field 'cidr'") }
            let cidr = try PolicyParser.parseCIDR(c)
            let except = try b["except"].map { try $0.sequence().map(PolicyParser.parseCIDR) } ?? []
            for (i, e) in except.enumerated() where !cidr.contains(e) || e == cidr {
                throw b["except"]!.error("except[\(i)] \(e) is not strictly inside \(cidr)")
            }
            return .cidr(cidr, except: except)
        }
        guard m["podSelector"] != nil || m["namespaceSelector"] != nil else {
            throw v.error("a peer needs podSelector, namespaceSelector or ipBlock")
        }
        var s = WorkloadSelector()
        if let p = m["podSelector"] { s.labels = try labelSelector(p) }
        if let n = m["namespaceSelector"] {
            s.namespaceLabels = try labelSelector(n)
        } else {
            s.namespace = namespace
        }
        return .workloads(s)
    }

    static func port(_ v: YAMLValue) throws -> PortRule {
        let m = try v.mapping(allowedKeys: ["protocol", "port", "endPort"])
        var proto = IPProtocol.tcp
        if let p = m["protocol"] {
            let s = try p.string()
            switch s {
            case "TCP": proto = .tcp
            case "UDP": proto = .udp
            case "SCTP": throw p.error("SCTP is not supported by Palisade")
            default: throw p.error("expected TCP, UDP or SCTP, got '\(s)'")
            }
        }
        guard let portNode = m["port"] else {
            if m["endPort"] != nil { throw v.error("'endPort' needs 'port'") }
            return PortRule(proto: proto)
        }
        guard let first = Int(try portNode.string()) else {
            // A named port: resolved on the selected pod (ingress) or the peer pod (egress).
            let name = try portNode.string()
            guard NamedPort.isValidName(name) else {
                throw portNode.error("expected a port number or an IANA service name (1-15 lowercase letters, digits and '-'), got '\(name)'")
            }
            if let e = m["endPort"] { throw e.error("'endPort' cannot be combined with a named port") }
            return PortRule(proto: proto, name: name)
        }
        guard (1...65535).contains(first) else { throw portNode.error("expected a port 1-65535, got \(first)") }
        var last = first
        if let e = m["endPort"] { last = try e.int(in: first...65535) }
        return PortRule(proto: proto, first: UInt16(first), last: UInt16(last))
    }
}
