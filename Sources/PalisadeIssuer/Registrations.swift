import Foundation
import PalisadeIdentity
import PalisadePolicy

/// The operator's rules of which nodes may hold which SPIFFE IDs, like
/// SPIRE's registration entries (the issuer's `registrations.yaml`):
///
///     apiVersion: palisade.dev/v1
///     kind: Registrations
///     entries:
///       - nodes: [n1, "web-*"]                               # node names; * matches any run of characters
///         spiffeIDs: ["spiffe://shop.test/ns/shop/*"]        # exact, or a prefix ending in /*
///
/// Nothing listed, nothing allowed: a node gets its own node SVID and no
/// workload SVID until an entry names it.
public struct Registrations: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var nodes: [String]
        public var spiffeIDs: [String]
    }
    public var entries: [Entry]
    public init(entries: [Entry] = []) { self.entries = entries }

    public static func parse(_ text: String, file: String) throws -> Registrations {
        let docs = try YAMLValue.documents(text, file: file).filter { !$0.isNull }
        guard docs.count <= 1 else { throw docs[1].error("expected one Registrations document") }
        guard let doc = docs.first else { return Registrations() }
        let m = try doc.mapping(allowedKeys: ["apiVersion", "kind", "entries"])
        guard try m["apiVersion"]?.string() == "palisade.dev/v1" else { throw doc.error("expected apiVersion: palisade.dev/v1") }
        guard try m["kind"]?.string() == "Registrations" else { throw doc.error("expected kind: Registrations") }
        let entries = try (m["entries"]?.sequence() ?? []).map { e -> Entry in
            let f = try e.mapping(allowedKeys: ["nodes", "spiffeIDs"])
            guard let nodesV = f["nodes"] else { throw e.error("missing field 'nodes' (node names the entry applies to)") }
            guard let idsV = f["spiffeIDs"] else { throw e.error("missing field 'spiffeIDs' (IDs those nodes may hold)") }
            let nodes = try nodesV.stringList()
            if nodes.isEmpty { throw nodesV.error("expected at least one node name") }
            let ids = try idsV.sequence().map { v -> String in
                let text = try v.string()
                let exact = text.hasSuffix("/*") ? String(text.dropLast(1)) + "x" : text
                guard (try? SpiffeID(exact)) != nil, !text.dropLast(text.hasSuffix("/*") ? 2 : 0).contains("*") else {
                    throw v.error("expected a SPIFFE ID, or a prefix ending in /* (like spiffe://td/ns/shop/*), got '\(text)'")
                }
                return text
            }
            return Entry(nodes: nodes, spiffeIDs: ids)
        }
        return Registrations(entries: entries)
    }

    /// May `node` hold `id`?
    public func allows(node: String, _ id: SpiffeID) -> Bool {
        let text = id.description
        return entries.contains { e in
            e.nodes.contains { Self.glob($0, node) } && e.spiffeIDs.contains { p in
                p.hasSuffix("/*") ? text.hasPrefix(String(p.dropLast(1))) && text.count > p.count - 1 : p == text
            }
        }
    }

    /// `*` matches any run of characters (node names have no structure).
    static func glob(_ pattern: String, _ name: String) -> Bool {
        let parts = pattern.split(separator: "*", omittingEmptySubsequences: false)
        guard parts.count > 1 else { return pattern == name }
        var rest = Substring(name)
        guard rest.hasPrefix(parts[0]) else { return false }
        rest = rest.dropFirst(parts[0].count)
        for (i, part) in parts.dropFirst().enumerated() {
            if i == parts.count - 2 { return part.isEmpty || rest.hasSuffix(part) }
            guard let r = rest.range(of: part) else { return false }
            rest = rest[r.upperBound...]
        }
        return true
    }
}
