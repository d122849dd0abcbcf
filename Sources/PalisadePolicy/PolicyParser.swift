import PalisadeIdentity

/// Reads policy files: Palisade's own format (apiVersion palisade.dev/v1,
/// kind Policy), several documents per file. Every error names the file,
/// line, column and field; a file with any error yields no policy at all.
public enum PolicyParser {
    public static let apiVersion = "palisade.dev/v1"

    public static func parse(_ text: String, file: String) throws -> [Policy] {
        var out: [Policy] = []
        for doc in try YAMLValue.documents(text, file: file) where !doc.isNull {
            let top = try doc.mapping()
            let api = try top["apiVersion"].map { try $0.string() }
            let kind = try top["kind"].map { try $0.string() }
            switch (api, kind) {
            case (apiVersion, "Policy"):
                out.append(try parsePolicy(doc))
            case (KubernetesImport.apiVersion, "NetworkPolicy"):
                out.append(try KubernetesImport.parse(doc))
            case (apiVersion, "HTTPPolicy"), ("security.istio.io/v1", "AuthorizationPolicy"), ("security.istio.io/v1beta1", "AuthorizationPolicy"):
                continue   // L7 rules: HTTPRuleSet.load reads these
            case (nil, _):
                throw doc.error("missing field 'apiVersion' (expected \(apiVersion))")
            case (_, nil):
                throw doc.error("missing field 'kind'")
            default:
                throw (top["kind"] ?? doc).error("unsupported apiVersion/kind '\(api!)/\(kind!)' (expected \(apiVersion)/Policy or \(KubernetesImport.apiVersion)/NetworkPolicy)")
            }
        }
        return out
    }

    static func parsePolicy(_ doc: YAMLValue) throws -> Policy {
        let top = try doc.mapping(allowedKeys: ["apiVersion", "kind", "metadata", "spec"])
        guard let metadata = top["metadata"] else { throw doc.error("missing field 'metadata'") }
        let meta = try metadata.mapping(allowedKeys: ["name", "labels", "annotations", "namespace"])
        guard let nameNode = meta["name"] else { throw metadata.error("missing field 'name'") }
        let name = try nameNode.string()
        guard isDNSLabelish(name) else {
            throw nameNode.error("expected a name of lowercase letters, digits, '-' and '.', 1-253 characters, got '\(name)'")
        }
        guard let specNode = top["spec"] else { throw doc.error("missing field 'spec'") }
        let spec = try specNode.mapping(allowedKeys: ["mode", "selector", "ingress", "egress"])
        var mode = PolicyMode.enforce
        if let m = spec["mode"] {
            guard let v = PolicyMode(rawValue: try m.string()) else { throw m.error("expected 'enforce' or 'audit', got \(m.kindName)") }
            mode = v
        }
        guard let selNode = spec["selector"] else {
            throw specNode.error("missing field 'selector' (use 'selector: {}' to select every workload)")
        }
        let selector = try parseSelector(selNode, allowNamespace: true)
        let ingress = try spec["ingress"].map { try parseRules($0, peerKey: "from") }
        let egress = try spec["egress"].map { try parseRules($0, peerKey: "to") }
        if ingress == nil && egress == nil {
            throw specNode.error("a policy needs 'ingress', 'egress' or both (an empty list isolates that direction and allows nothing)")
        }
        return Policy(name: name, mode: mode, selector: selector, ingress: ingress, egress: egress, location: doc.location)
    }

    static let selectorKeys: Set<String> = ["spiffeID", "spiffeIDPrefix", "labels", "matchExpressions", "namespace",
                                            "namespaceLabels", "namespaceExpressions"]

    static func parseSelector(_ v: YAMLValue, allowNamespace: Bool) throws -> WorkloadSelector {
        if v.isNull { return WorkloadSelector() }
        let m = try v.mapping(allowedKeys: selectorKeys)
        return try selector(from: m, in: v)
    }

    static func selector(from m: [String: YAMLValue], in v: YAMLValue) throws -> WorkloadSelector {
        var s = WorkloadSelector()
        if let id = m["spiffeID"] { s.spiffeID = try spiffe(id) }
        if let p = m["spiffeIDPrefix"] { s.spiffeIDPrefix = try spiffe(p) }
        if let l = m["labels"] { s.labels.matchLabels = try labels(l) }
        if let e = m["matchExpressions"] { s.labels.matchExpressions = try expressions(e) }
        if let ns = m["namespace"] { s.namespace = try ns.string() }
        if m["namespaceLabels"] != nil || m["namespaceExpressions"] != nil {
            s.namespaceLabels = LabelSelector(matchLabels: try m["namespaceLabels"].map(labels) ?? [:],
                                              matchExpressions: try m["namespaceExpressions"].map(expressions) ?? [])
        }
        return s
    }

    public static func spiffe(_ v: YAMLValue) throws -> SpiffeID {
        let text = try v.string()
        do { return try SpiffeID(text) } catch let e as SpiffeID.ParseError {
            throw v.error("expected a SPIFFE ID (spiffe://trust-domain/path), got '\(text)': \(e)")
        }
    }

    public static func labels(_ v: YAMLValue) throws -> [String: String] {
        let m = try v.stringMap()
        for (k, value) in m {
            guard isLabelKey(k) else { throw v.error("invalid label key '\(k)'") }
            guard value.count <= 63, value.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) else {
                throw v.error("invalid value '\(value)' for label '\(k)' (letters, digits, '-', '_', '.', at most 63)")
            }
        }
        return m
    }

    public static func expressions(_ v: YAMLValue) throws -> [LabelSelector.Requirement] {
        try v.sequence().map { e in
            let m = try e.mapping(allowedKeys: ["key", "operator", "values"])
            guard let k = m["key"] else { throw e.error("missing field 'key'") }
            guard let o = m["operator"] else { throw e.error("missing field 'operator'") }
            guard let op = LabelSelector.Operator(rawValue: try o.string()) else {
                throw o.error("expected In, NotIn, Exists or DoesNotExist, got \(o.kindName)")
            }
            let values = try m["values"].map { try $0.stringList() } ?? []
            if (op == .in || op == .notIn) && values.isEmpty { throw e.error("operator \(op.rawValue) needs a non-empty 'values'") }
            if (op == .exists || op == .doesNotExist) && !values.isEmpty { throw e.error("operator \(op.rawValue) takes no 'values'") }
            return .init(key: try k.string(), op: op, values: values)
        }
    }

    static func parseRules(_ v: YAMLValue, peerKey: String) throws -> [Rule] {
        if v.isNull { return [] }
        return try v.sequence().map { r in
            let egress = peerKey == "to"
            let m = try r.mapping(allowedKeys: egress ? ["action", peerKey, "toFQDNs", "ports", "dns"] : ["action", peerKey, "ports"])
            var action = Action.allow
            if let a = m["action"] {
                guard let x = Action(rawValue: try a.string()) else { throw a.error("expected 'allow' or 'deny', got \(a.kindName)") }
                action = x
            }
            let peers = try m[peerKey].map { p in p.isNull ? [] : try p.sequence().map(parsePeer) } ?? []
            let fqdns = try m["toFQDNs"].map { try fqdnSelectors($0, field: "toFQDNs") } ?? []
            if m["toFQDNs"] != nil && fqdns.isEmpty { throw m["toFQDNs"]!.error("'toFQDNs' needs at least one matchName or matchPattern") }
            let ports = try m["ports"].map { p in p.isNull ? [] : try p.sequence().map(parsePort) } ?? []
            let dns = try m["dns"].map { try fqdnSelectors($0, field: "dns") }
            return Rule(action: action, peers: peers + fqdns.map { .fqdn($0) }, ports: ports, location: r.location, dns: dns)
        }
    }

    static func parsePeer(_ v: YAMLValue) throws -> Peer {
        let m = try v.mapping(allowedKeys: selectorKeys.union(["cidr", "except", "entity"]))
        let kinds = [m.keys.contains { selectorKeys.contains($0) }, m["cidr"] != nil, m["entity"] != nil].filter { $0 }.count
        guard kinds == 1 else {
            throw v.error("a peer is exactly one of: a workload selector (spiffeID, spiffeIDPrefix, labels, matchExpressions, namespace, namespaceLabels, namespaceExpressions), 'cidr' (with optional 'except'), or 'entity'")
        }
        if let c = m["cidr"] {
            let cidr = try parseCIDR(c)
            let except = try m["except"].map { e in try e.sequence().map(parseCIDR) } ?? []
            for (i, e) in except.enumerated() where !cidr.contains(e) || e == cidr {
                throw m["except"]!.error("except[\(i)] \(e) is not strictly inside \(cidr)")
            }
            return .cidr(cidr, except: except)
        }
        if m["except"] != nil { throw v.error("'except' needs 'cidr'") }
        if let e = m["entity"] {
            guard let x = Entity(rawValue: try e.string()) else { throw e.error("expected 'host', 'world' or 'all', got \(e.kindName)") }
            return .entity(x)
        }
        return .workloads(try selector(from: m, in: v))
    }

    /// `[{matchName: api.example.com}, {matchPattern: "*.example.com"}]`.
    static func fqdnSelectors(_ v: YAMLValue, field: String) throws -> [FQDNSelector] {
        if v.isNull { return [] }
        return try v.sequence().map { e in
            let m = try e.mapping(allowedKeys: ["matchName", "matchPattern"])
            guard m.count == 1, let (key, node) = m.first else {
                throw e.error("each \(field) entry is exactly one of 'matchName' or 'matchPattern'")
            }
            let text = try node.string()
            let pattern = key == "matchPattern"
            if let problem = FQDNSelector.problem(name: text, pattern: pattern) {
                throw node.error("expected a DNS \(pattern ? "name pattern such as '*.example.com'" : "name such as 'api.example.com'") in \(key), got '\(text)': \(problem)")
            }
            let n = FQDNSelector.normalize(text)
            return pattern && n.contains("*") ? .pattern(n) : .name(n)
        }
    }

    public static func parseCIDR(_ v: YAMLValue) throws -> CIDR {
        let s = try v.string()
        guard let c = CIDR(s) else { throw v.error("expected a CIDR such as 10.0.0.0/8 or fd00::/64 (no host bits set), got '\(s)'") }
        return c
    }

    /// A workload's named ports: a list of `{name, port, protocol}` (protocol
    /// TCP unless given) or of `NAME=PORT[/PROTOCOL]` strings. A name is
    /// declared once per protocol.
    public static func namedPorts(_ v: YAMLValue) throws -> [NamedPort] {
        var out: [NamedPort] = []
        for e in try v.sequence() {
            let np: NamedPort
            if case .scalar = e.node {
                let text = try e.string()
                guard let p = NamedPort(text) else {
                    throw e.error("expected NAME=PORT or NAME=PORT/PROTOCOL (a name of 1-15 lowercase letters, digits and '-'; port 1-65535; tcp or udp), got '\(text)'")
                }
                np = p
            } else {
                let m = try e.mapping(allowedKeys: ["name", "port", "protocol"])
                guard let n = m["name"], let p = m["port"] else { throw e.error("a named port needs 'name' and 'port'") }
                let name = try n.string()
                guard NamedPort.isValidName(name) else {
                    throw n.error("expected a port name of 1-15 lowercase letters, digits and '-' with at least one letter, got '\(name)'")
                }
                var proto = IPProtocol.tcp
                if let pr = m["protocol"] {
                    guard let x = IPProtocol(name: try pr.string()), x.hasPorts else { throw pr.error("expected TCP or UDP, got '\(try pr.string())'") }
                    proto = x
                }
                np = NamedPort(name: name, port: UInt16(try p.int(in: 1...65535)), proto: proto)
            }
            if let dup = out.first(where: { $0.name == np.name && $0.proto == np.proto }) {
                throw e.error("port name '\(np.name)' (\(np.proto)) is declared twice (\(dup.port) and \(np.port))")
            }
            out.append(np)
        }
        return out
    }

    static func parsePort(_ v: YAMLValue) throws -> PortRule {
        let m = try v.mapping(allowedKeys: ["port", "endPort", "protocol"])
        var proto: IPProtocol? = .tcp
        if let p = m["protocol"] {
            let s = try p.string()
            if s.uppercased() == "ANY" { proto = nil }
            else {
                guard let x = IPProtocol(name: s) else { throw p.error("expected TCP, UDP, ICMP, ICMPv6 or ANY, got '\(s)'") }
                proto = x
            }
        }
        guard let portNode = m["port"] else {
            if m["endPort"] != nil { throw v.error("'endPort' needs 'port'") }
            if m["protocol"] == nil { throw v.error("a port entry needs 'port', 'protocol' or both") }
            return PortRule(proto: proto)
        }
        guard let p = proto, p.hasPorts else {
            throw portNode.error("ports apply to TCP and UDP only (protocol is \(proto.map { "\($0)" } ?? "ANY"))")
        }
        if case .scalar(let s) = portNode.node, let c = s.string.first, c.isLetter {
            // A named port, resolved on the workloads (see PortRule).
            guard NamedPort.isValidName(s.string) else {
                throw portNode.error("expected a port 1-65535, a range 'LOW-HIGH' or a port name (1-15 lowercase letters, digits and '-'), got '\(s.string)'")
            }
            if let e = m["endPort"] { throw e.error("'endPort' cannot be combined with a named port") }
            return PortRule(proto: p, name: s.string)
        }
        var first: Int, last: Int
        if case .scalar(let s) = portNode.node, s.string.contains("-") {
            let parts = s.string.split(separator: "-")
            guard parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]), (1...65535).contains(a), (1...65535).contains(b), a <= b else {
                throw portNode.error("expected a port 1-65535 or a range 'LOW-HIGH', got '\(s.string)'")
            }
            first = a; last = b
        } else {
            first = try portNode.int(in: 1...65535)
            last = first
        }
        if let e = m["endPort"] {
            guard first == last else { throw e.error("'endPort' cannot be combined with a port range") }
            last = try e.int(in: first...65535)
        }
        return PortRule(proto: p, first: UInt16(first), last: UInt16(last))
    }

    public static func isDNSLabelish(_ s: String) -> Bool {
        !s.isEmpty && s.count <= 253
            && s.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "-" || $0 == ".") }
            && (s.first!.isLetter || s.first!.isNumber)
    }

    static func isLabelKey(_ s: String) -> Bool {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let name = parts.last, !name.isEmpty, name.count <= 63 else { return false }
        if parts.count == 2 && (parts[0].isEmpty || parts[0].count > 253) { return false }
        return s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_./".contains($0)) }
    }
}

/// A set of policies loaded from files, with names unique across the set.
public struct PolicySet: Sendable {
    public var policies: [Policy]
    public init(policies: [Policy]) { self.policies = policies }

    /// Parses each (file, text); any error in any file fails the whole set.
    public static func load(_ files: [(name: String, text: String)]) throws -> PolicySet {
        var all: [Policy] = []
        var seen: [String: SourceLocation] = [:]
        var errors: [InputError] = []
        for f in files {
            do {
                for p in try PolicyParser.parse(f.text, file: f.name) {
                    if let prev = seen[p.name] {
                        errors.append(InputError(p.location, field: "metadata.name", "policy '\(p.name)' is already defined at \(prev)"))
                    }
                    seen[p.name] = p.location
                    all.append(p)
                }
            } catch let e as InputError {
                errors.append(e)
            }
        }
        if !errors.isEmpty { throw PolicyLoadErrors(errors: errors) }
        return PolicySet(policies: all)
    }
}

public struct PolicyLoadErrors: Error, CustomStringConvertible {
    public var errors: [InputError]
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
