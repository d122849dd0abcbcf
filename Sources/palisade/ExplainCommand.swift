import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy

/// `palisade policy explain`: the verdict for a new flow and the rule that
/// decided it, from the live kernel maps (so it agrees with the datapath).
struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Which verdict a new flow gets, and which rule (file:line) decides it.")
    @OptionGroup var options: ConfigOption
    @Option(help: "Source: an enrolled workload's name or an IP address.") var from: String
    @Option(help: "Destination: an enrolled workload's name, an IP address, or a DNS name (its addresses as DNS last answered through the agent's proxy).") var to: String
    @Option(help: "Destination port.") var port: UInt16 = 0
    @Option(name: .customLong("protocol"), help: "tcp, udp, icmp or icmpv6.") var proto: String = "tcp"
    @Option var output: OutputFormat = .table

    struct Endpoint { var name: String; var identity: NumericIdentity?; var addresses: [IPAddress] }

    struct Check: Encodable {
        var side: String          // "egress of SOURCE" / "ingress of DESTINATION"
        var workload: String
        var enforced: Bool
        var verdict: String
        var peerIdentity: String
        var reason: String
    }
    struct Result: Encodable { var verdict: String; var source: String; var destination: String; var port: UInt16; var proto: String; var generation: UInt64; var checks: [Check] }

    func resolve(_ text: String, state: AgentState, workloads: [String: [IPAddress]], fqdnFile: String? = nil) throws -> Endpoint {
        if let fqdnFile, IPAddress(text) == nil, !state.endpoints.contains(where: { $0.workload == text }), text.contains(".") {
            return try resolveName(text, state: state, fqdnFile: fqdnFile)
        }
        if let ip = IPAddress(text) {
            let id = state.endpoints.first { workloads[$0.workload]?.contains(ip) == true }
            return Endpoint(name: text, identity: id?.identity, addresses: [ip])
        }
        guard let e = state.endpoints.first(where: { $0.workload == text }) else {
            throw CLIError("'\(text)' is neither an IP address nor an enrolled workload")
        }
        return Endpoint(name: text, identity: e.identity, addresses: workloads[text] ?? [])
    }

    /// A DNS name: the addresses the agent learned for it (STATE/fqdn.json).
    /// None learned: which toFQDNs selectors would take its answers.
    func resolveName(_ name: String, state: AgentState, fqdnFile: String) throws -> Endpoint {
        let n = FQDNSelector.normalize(name)
        let learned = FQDNEgress.load(fqdnFile).filter { $0.name == n }.map(\.address)
        if !learned.isEmpty { return Endpoint(name: n, identity: nil, addresses: Array(Set(learned)).sorted()) }
        let matching = (state.fqdnSelectors ?? []).filter { $0.matches(n) }.map(\.description)
        throw CLIError("no address learned for \(n): no enrolled workload has resolved it through the agent's DNS proxy yet (or its TTL and grace ran out). "
                       + (matching.isEmpty ? "No toFQDNs rule in force matches it: its addresses would be judged like any other address."
                                           : "toFQDNs selectors in force that match it: \(matching.joined(separator: ", ")); its addresses are allowed (on those rules' ports) once a lookup returns them."))
    }

    func run() throws {
        let config = try options.load()
        guard let p = IPProtocol(name: proto) else { throw CLIError("--protocol: expected tcp, udp, icmp or icmpv6, got '\(proto)'") }
        guard let state = AgentState.load(config.stateFile) else { throw CLIError("no agent state at \(config.stateFile)") }
        let maps = try PalisadeMaps.openPinned(at: config.bpffs)
        var addresses: [String: [IPAddress]] = [:]
        for f in readYAMLDirectory(config.resolvedWorkloadDir) {
            for w in (try? Workload.parse(f.text, file: f.name, trustDomain: config.trustDomain)) ?? [] { addresses[w.name] = w.addresses }
        }
        let src = try resolve(from, state: state, workloads: addresses)
        let dst = try resolve(to, state: state, workloads: addresses, fqdnFile: config.fqdnFile)
        // Pick one address family for both ends: the destination's first address
        // of the family the source has too (IPv4 first).
        // A cgroup workload shares the node's addresses and has none of its
        // own: its egress is judged by identity, whatever the source address.
        let srcAddresses = src.addresses.isEmpty && src.identity != nil ? [IPAddress.v4(0, 0, 0, 0), IPAddress("::")!] : src.addresses
        let families = [true, false].filter { v4 in srcAddresses.contains { $0.isV4 == v4 } && dst.addresses.contains { $0.isV4 == v4 } }
        guard let v4 = families.first, let srcIP = srcAddresses.first(where: { $0.isV4 == v4 }),
              let dstIP = dst.addresses.first(where: { $0.isV4 == v4 }) else {
            throw CLIError("\(from) and \(to) have no address family in common")
        }

        let kernel = KernelLookup(maps: maps)
        var checks: [Check] = []
        var allowed = true
        var generation: UInt64 = maps.activeConfig.generation
        for (side, ep, peerIP) in [("egress", src, dstIP), ("ingress", dst, srcIP)] {
            guard let id = ep.identity else { continue }
            let a = try kernel.decide(local: id, direction: side == "egress" ? .egress : .ingress, peer: peerIP, proto: p.rawValue, port: port)
            generation = a.generation
            let reason: String
            if !a.enforced {
                reason = "no policy selects \(state.name(of: id.rawValue)) for \(side): unrestricted"
            } else if let r = state.rule(a.ruleID) {
                reason = r.summary
            } else {
                reason = "rule #\(a.ruleID) (the agent's state does not name it)"
            }
            if a.verdict == .deny { allowed = false }
            var peer = state.name(of: a.peerIdentity)
            if a.peerCIDRIdentity != 0 { peer += " (in \(state.name(of: a.peerCIDRIdentity)))" }
            if a.peerFQDNClass != 0 { peer += " (DNS: \(state.name(of: a.peerFQDNClass)))" }
            checks.append(Check(side: "\(side) of \(ep.name)", workload: state.name(of: id.rawValue), enforced: a.enforced,
                                verdict: a.verdict == .audit ? "audit" : a.verdict.description, peerIdentity: peer, reason: reason))
        }
        if checks.isEmpty { throw CLIError("neither \(from) nor \(to) is an enrolled workload on this node: nothing enforces this flow here") }
        let result = Result(verdict: (allowed ? Outcome.allowed : .denied).rawValue, source: "\(srcIP)", destination: "\(dstIP)", port: port,
                            proto: p.description, generation: generation, checks: checks)
        if output == .json { try printJSON(result); return }
        print("\(result.verdict.uppercased()): \(p) \(srcIP) -> \(dstIP):\(port) (policy generation \(generation))")
        for c in checks {
            print("  \(c.side) [\(c.workload)]: \(c.verdict), peer \(c.peerIdentity)")
            print("    \(c.reason)")
        }
    }
}
