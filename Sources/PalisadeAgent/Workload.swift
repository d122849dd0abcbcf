import Foundation
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy

/// An enrolled workload: a pod-like network namespace reached through a veth
/// (its host-side interface and addresses), or a cgroup of processes that
/// share the node's network.
public struct Workload: Codable, Hashable, Sendable {
    public enum Attachment: Codable, Hashable, Sendable {
        case pod(interface: String)
        case cgroup(path: String)   // relative to the cgroup2 mount, or absolute
    }
    public var name: String
    public var spiffeID: SpiffeID
    public var namespace: String
    public var labels: [String: String]
    /// Labels of the workload's namespace (Kubernetes namespaceSelector);
    /// kubernetes.io/metadata.name is always set to the namespace.
    public var namespaceLabels: [String: String] = [:]
    public var addresses: [IPAddress]
    public var attachment: Attachment
    public var source: SourceLocation
    /// Mutual TLS mode (strict, permissive, disabled); permissive unless set,
    /// so enrolling a workload does not cut its existing plaintext clients.
    public var mtls = Datapath.MTLSMode.permissive
    /// A pod-like workload's cgroup (its container's), whose processes get
    /// the socket redirection to the tunnel. Without it, a pod's connections
    /// to remote workloads are judged by the packet programs only.
    public var podCgroup: String?
    /// Named ports (Kubernetes containerPort names), for policies that name ports.
    public var ports: [NamedPort] = []

    public init(name: String, spiffeID: SpiffeID, namespace: String = "default", labels: [String: String] = [:],
                addresses: [IPAddress] = [], attachment: Attachment, source: SourceLocation) {
        self.name = name; self.spiffeID = spiffeID; self.namespace = namespace; self.labels = labels
        self.addresses = addresses; self.attachment = attachment; self.source = source
    }

    static let keys: Set<String> = ["name", "spiffeID", "namespace", "namespaceLabels", "labels", "addresses", "interface", "cgroup", "mtls", "ports"]

    /// Parses workload documents (one or more per file).
    public static func parse(_ text: String, file: String, trustDomain: String) throws -> [Workload] {
        try YAMLValue.documents(text, file: file).filter { !$0.isNull }.map { try parse($0, trustDomain: trustDomain) }
    }

    /// One workload from a YAML mapping (a workload file's document, or an
    /// entry of the agent configuration's `workloads` list).
    public static func parse(_ doc: YAMLValue, trustDomain: String) throws -> Workload {
        let m = try doc.mapping(allowedKeys: keys)
        guard let n = m["name"] else { throw doc.error("missing field 'name'") }
        let name = try n.string()
        guard !name.isEmpty, name.count <= 63, name.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "-") }) else {
            throw n.error("expected a name of lowercase letters, digits and '-', at most 63, got '\(name)'")
        }
        guard let s = m["spiffeID"] else { throw doc.error("missing field 'spiffeID'") }
        let id = try PolicyParser.spiffe(s)
        guard id.trustDomain == trustDomain else {
            throw s.error("SPIFFE ID \(id) is not in this node's trust domain '\(trustDomain)'")
        }
        let ns = try m["namespace"].map { try $0.string() } ?? "default"
        let labels = try m["labels"].map { try PolicyParser.labels($0) } ?? [:]
        let addresses: [IPAddress] = try m["addresses"].map { a in
            try a.sequence().map { v -> IPAddress in
                guard let ip = IPAddress(try v.string()) else { throw v.error("expected an IP address, got \(v.kindName)") }
                return ip
            }
        } ?? []
        let attachment: Attachment
        var podCgroup: String?
        func cgroupPath(_ c: YAMLValue) throws -> String {
            let path = try c.string()
            guard !path.isEmpty, !path.split(separator: "/").contains("..") else { throw c.error("expected a cgroup path without '..'") }
            return path
        }
        switch (m["interface"], m["cgroup"]) {
        case (let i?, let c):
            let ifname = try i.string()
            guard !ifname.isEmpty, ifname.utf8.count < 16 else { throw i.error("expected an interface name of 1-15 bytes") }
            guard !addresses.isEmpty else { throw doc.error("a pod-like workload needs 'addresses' (the pod's IPs)") }
            attachment = .pod(interface: ifname)
            podCgroup = try c.map(cgroupPath)
        case (nil, let c?):
            attachment = .cgroup(path: try cgroupPath(c))
        default:
            throw doc.error("a workload needs 'interface' (pod-like: host side of its veth, optionally with its 'cgroup') or 'cgroup' (processes sharing the node's network)")
        }
        var w = Workload(name: name, spiffeID: id, namespace: ns, labels: labels, addresses: addresses,
                         attachment: attachment, source: doc.location)
        w.namespaceLabels = try m["namespaceLabels"].map { try PolicyParser.labels($0) } ?? [:]
        w.podCgroup = podCgroup
        w.ports = try m["ports"].map { try PolicyParser.namedPorts($0) } ?? []
        if let v = m["mtls"] {
            let text = try v.string()
            guard let mode = Datapath.MTLSMode(rawValue: text) else {
                throw v.error("expected one of \(Datapath.MTLSMode.allCases.map(\.rawValue).joined(separator: ", ")), got '\(text)'")
            }
            w.mtls = mode
        }
        return w
    }

    public func yaml() -> String {
        var lines = ["name: \(name)", "spiffeID: \(spiffeID)", "namespace: \(namespace)"]
        if !labels.isEmpty {
            lines.append("labels:")
            lines += labels.sorted { $0.key < $1.key }.map { "  \($0.key): \"\($0.value)\"" }
        }
        if !addresses.isEmpty { lines.append("addresses: [\(addresses.map { "\"\($0)\"" }.joined(separator: ", "))]") }
        switch attachment {
        case .pod(let i):
            lines.append("interface: \(i)")
            if let c = podCgroup { lines.append("cgroup: \(c)") }
        case .cgroup(let p): lines.append("cgroup: \(p)")
        }
        if mtls != .permissive { lines.append("mtls: \(mtls.rawValue)") }
        if !ports.isEmpty { lines.append("ports: [\(ports.map { "\"\($0)\"" }.joined(separator: ", "))]") }
        return lines.joined(separator: "\n") + "\n"
    }
}

/// Reads a directory of YAML files in name order: (file name, contents).
public func readYAMLDirectory(_ dir: String) -> [(name: String, text: String)] {
    let fm = FileManager.default
    guard let names = try? fm.contentsOfDirectory(atPath: dir) else { return [] }
    return names.filter { ($0.hasSuffix(".yaml") || $0.hasSuffix(".yml")) && !$0.hasPrefix(".") }.sorted().compactMap { n in
        let path = "\(dir)/\(n)"
        return (try? String(contentsOfFile: path, encoding: .utf8)).map { (path, $0) }
    }
}
