import Foundation

/// Writes policies in Palisade's own format (used by `policy convert`).
/// Strings are emitted as JSON strings, which YAML reads back verbatim.
public enum PolicyWriter {
    public static func yaml(_ policies: [Policy]) -> String {
        policies.map(document).joined(separator: "---\n")
    }

    static func q(_ s: String) -> String {
        let data = try! JSONEncoder().encode(s)
        return String(decoding: data, as: UTF8.self).replacingOccurrences(of: "\\/", with: "/")
    }

    static func map(_ m: [String: String]) -> String {
        "{" + m.sorted { $0.key < $1.key }.map { "\(q($0.key)): \(q($0.value))" }.joined(separator: ", ") + "}"
    }

    static func expressions(_ e: [LabelSelector.Requirement]) -> String {
        "[" + e.map { r in
            "{key: \(q(r.key)), operator: \(r.op.rawValue)" + (r.values.isEmpty ? "" : ", values: [\(r.values.map(q).joined(separator: ", "))]") + "}"
        }.joined(separator: ", ") + "]"
    }

    /// Selector fields as "key: value" pairs (flow style).
    static func selectorFields(_ s: WorkloadSelector) -> [String] {
        var f: [String] = []
        if let id = s.spiffeID { f.append("spiffeID: \(q(id.description))") }
        if let p = s.spiffeIDPrefix { f.append("spiffeIDPrefix: \(q(p.description))") }
        if let ns = s.namespace { f.append("namespace: \(q(ns))") }
        if !s.labels.matchLabels.isEmpty { f.append("labels: \(map(s.labels.matchLabels))") }
        if !s.labels.matchExpressions.isEmpty { f.append("matchExpressions: \(expressions(s.labels.matchExpressions))") }
        if let n = s.namespaceLabels {
            f.append("namespaceLabels: \(map(n.matchLabels))")
            if !n.matchExpressions.isEmpty { f.append("namespaceExpressions: \(expressions(n.matchExpressions))") }
        }
        return f
    }

    static func peer(_ p: Peer) -> String {
        switch p {
        case .workloads(let s): return "{" + selectorFields(s).joined(separator: ", ") + "}"
        case .cidr(let c, let except):
            return except.isEmpty ? "{cidr: \(q(c.description))}" : "{cidr: \(q(c.description)), except: [\(except.map { q($0.description) }.joined(separator: ", "))]}"
        case .entity(let e): return "{entity: \(e.rawValue)}"
        case .fqdn: return ""   // written under toFQDNs
        }
    }

    static func fqdn(_ f: FQDNSelector) -> String {
        switch f {
        case .name(let n): return "{matchName: \(q(n))}"
        case .pattern(let p): return "{matchPattern: \(q(p))}"
        }
    }

    static func port(_ p: PortRule) -> String {
        guard let proto = p.proto else { return "{protocol: ANY}" }
        if let name = p.name { return "{port: \(name), protocol: \(proto)}" }
        guard let first = p.first, let last = p.last else { return "{protocol: \(proto)}" }
        return first == last ? "{port: \(first), protocol: \(proto)}" : "{port: \(first), endPort: \(last), protocol: \(proto)}"
    }

    static func rules(_ rs: [Rule], _ key: String) -> [String] {
        rs.map { r in
            var lines = ["    - action: \(r.action.rawValue)"]
            let plain = r.peers.filter { if case .fqdn = $0 { return false } else { return true } }
            let names = r.peers.compactMap { if case .fqdn(let f) = $0 { return f } else { return nil } }
            if !plain.isEmpty { lines.append("      \(key): [\(plain.map(peer).joined(separator: ", "))]") }
            if !names.isEmpty { lines.append("      toFQDNs: [\(names.map(fqdn).joined(separator: ", "))]") }
            if let dns = r.dns { lines.append("      dns: [\(dns.map(fqdn).joined(separator: ", "))]") }
            if !r.ports.isEmpty { lines.append("      ports: [\(r.ports.map(port).joined(separator: ", "))]") }
            return lines.joined(separator: "\n")
        }
    }

    static func document(_ p: Policy) -> String {
        var lines = ["apiVersion: \(PolicyParser.apiVersion)", "kind: Policy", "metadata:", "  name: \(q(p.name))", "spec:"]
        if p.mode != .enforce { lines.append("  mode: \(p.mode.rawValue)") }
        lines.append("  selector: {" + selectorFields(p.selector).joined(separator: ", ") + "}")
        for (key, peerKey, rs) in [("ingress", "from", p.ingress), ("egress", "to", p.egress)] {
            guard let rs else { continue }
            if rs.isEmpty { lines.append("  \(key): []"); continue }
            lines.append("  \(key):")
            lines += rules(rs, peerKey)
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
