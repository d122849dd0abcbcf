import ArgumentParser
import CPalisadeShared
import Foundation
import PalisadeAgent
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy

/// `palisade graph`: the effective policy, from the kernel maps, as a
/// Graphviz graph: identities as nodes (default-deny ones marked), allowed
/// edges labelled with ports, denied and audited ones on request.
struct GraphCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "graph", abstract: "Draw the effective policy (Graphviz DOT, or SVG/PNG when dot is installed).")
    @OptionGroup var options: ConfigOption
    @Flag(help: "Also draw deny and audit rules (red / orange, dashed).") var denied = false
    @Option(name: .customLong("output"), help: "Write to FILE (.dot, .svg or .png) instead of printing DOT.") var file: String?

    func run() throws {
        let config = try options.load()
        let maps = try PalisadeMaps.openPinned(at: config.bpffs)
        let state = AgentState.load(config.stateFile) ?? AgentState()
        let dot = try GraphCommand.render(maps: maps, state: state, withDenied: denied)
        guard let file else { print(dot, terminator: ""); return }
        let ext = (file as NSString).pathExtension.lowercased()
        if ext == "dot" || ext.isEmpty { try dot.write(toFile: file, atomically: true, encoding: .utf8); return }
        guard ["svg", "png"].contains(ext) else { throw CLIError("--output: expected a .dot, .svg or .png file") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["dot", "-T\(ext)", "-o", file]
        let input = Pipe()
        p.standardInput = input
        do { try p.run() } catch { throw CLIError("cannot run dot (apt-get install graphviz), or use a .dot file: \(error)") }
        input.fileHandleForWriting.write(Data(dot.utf8))
        input.fileHandleForWriting.closeFile()
        p.waitUntilExit()
        if p.terminationStatus != 0 { throw CLIError("dot failed (is graphviz installed?)") }
    }

    static func q(_ s: String) -> String {
        "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n") + "\""
    }

    /// "TCP 8080, UDP 9000-9100": the trie's aligned blocks merged back into ranges.
    static func portLabel(_ ranges: [String: [(UInt32, UInt32)]]) -> String {
        ranges.keys.sorted().map { proto -> String in
            let rs = ranges[proto]!.sorted { $0.0 < $1.0 }
            if rs.isEmpty { return proto }
            var merged: [(UInt32, UInt32)] = []
            for r in rs {
                if let last = merged.last, r.0 <= last.1 + 1 { merged[merged.count - 1].1 = max(last.1, r.1) } else { merged.append(r) }
            }
            return merged.map { $0.0 == 0 && $0.1 == 65535 ? proto : ($0.0 == $0.1 ? "\(proto) \($0.0)" : "\(proto) \($0.0)-\($0.1)") }
                .joined(separator: ", ")
        }.joined(separator: ", ")
    }

    static func render(maps: PalisadeMaps, state: AgentState, withDenied: Bool) throws -> String {
        let slot = UInt8(maps.activeConfig.active_slot & 1)
        var isolated: [UInt32: [String]] = [:]
        for (k, _) in try maps.defaults.entries() where k.generation == slot {
            isolated[k.local_identity, default: []].append(Direction(kernel: k.direction).rawValue)
        }
        struct Edge: Hashable { var from: UInt32; var to: UInt32; var verdict: UInt8 }
        var edges: [Edge: [String: [(UInt32, UInt32)]]] = [:]
        var nodes = Set(isolated.keys).union(state.identities.keys)
        // Entries name peer classes: draw the identities each class stands for.
        var classMembers: [UInt32: [UInt32]] = [:]
        for (k, c) in try maps.peerClasses.entries() where k.generation == slot { classMembers[c, default: []].append(k.identity) }
        for (k, v) in try maps.policy.entries() where k.generation == slot {
            guard v.verdict == UInt8(PAL_VERDICT_ALLOW.rawValue) || withDenied else { continue }
            let local = UInt32(bigEndian: k.local_identity), peerKey = UInt32(bigEndian: k.peer_class)
            let peers = NumericIdentity(peerKey).isWorkload ? (classMembers[peerKey] ?? []).sorted() : [peerKey]
            let ingress = Direction(kernel: k.direction) == .ingress
            for peer in peers {
            let edge = Edge(from: ingress ? peer : local, to: ingress ? local : peer, verdict: v.verdict)
            let bits = Int(k.prefixlen)
            let port = UInt32(UInt16(bigEndian: k.dport))
            let proto = bits <= Int(PAL_POLICY_BITS_PEER) ? "any" : (IPProtocol(rawValue: k.protocol)?.description ?? "\(k.protocol)")
            let portBits = bits - Int(PAL_POLICY_BITS_PROTO)
            var byProto = edges[edge] ?? [:]
            if proto == "any" { byProto["any"] = byProto["any"] ?? [] }
            else if portBits <= 0 { byProto[proto, default: []].append((0, 65535)) }
            else { byProto[proto, default: []].append((port, port + (1 << (16 - portBits)) - 1)) }
            edges[edge] = byProto
            nodes.insert(edge.from); nodes.insert(edge.to)
            }
        }
        var out = ["digraph palisade {", "  rankdir=LR;", "  node [shape=box, style=rounded, fontname=Helvetica];", "  edge [fontname=Helvetica, fontsize=10];"]
        for n in nodes.sorted() {
            let name = n == 0 ? "any peer" : state.name(of: n)
            var label = name
            if let dirs = isolated[n] { label += "\ndefault deny: " + dirs.sorted().joined(separator: ", ") }
            let style = n < 256 ? ", shape=ellipse" : (isolated[n] != nil ? ", color=firebrick, penwidth=2" : "")
            out.append("  n\(n) [label=\(q(label))\(style)];")
        }
        for (e, labels) in edges.sorted(by: { ($0.key.from, $0.key.to, $0.key.verdict) < ($1.key.from, $1.key.to, $1.key.verdict) }) {
            let style: String
            switch Verdict(rawValue: e.verdict) {
            case .deny: style = ", color=red, fontcolor=red, style=dashed"
            case .audit: style = ", color=orange, fontcolor=orange, style=dashed"
            default: style = ", color=darkgreen"
            }
            out.append("  n\(e.from) -> n\(e.to) [label=\(q(portLabel(labels)))\(style)];")
        }
        out.append("}")
        return out.joined(separator: "\n") + "\n"
    }
}
