import ArgumentParser
import CPalisadeShared
import Foundation
import PalisadeAgent
import PalisadeDatapath
import PalisadeIdentity
import PalisadePolicy

/// Reads the pinned maps directly, so it works while the agent is stopped.
struct MapsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "maps", abstract: "Inspect the kernel maps.", subcommands: [Dump.self])

    enum Kind: String, ExpressibleByArgument, CaseIterable {
        case policy, classes, identities, ipcache, conntrack, endpoints, counters
        case l7ports = "l7-ports"
        case fqdn
    }

    struct Dump: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Decode a map into a readable table.")
        @Argument(help: "One of: \(Kind.allCases.map(\.rawValue).joined(separator: ", ")).") var kind: Kind
        @OptionGroup var options: ConfigOption
        @Option var output: OutputFormat = .table

        func run() throws {
            let config = try options.load()
            let maps: PalisadeMaps
            do { maps = try PalisadeMaps.openPinned(at: config.bpffs) } catch {
                throw CLIError("cannot open Palisade's pinned maps under \(config.bpffs): \(error) (has the agent run?)")
            }
            let state = AgentState.load(config.stateFile) ?? AgentState()
            let dumper = MapDumper(maps: maps, state: state)
            let rows: [[String: String]]
            let columns: [String]
            switch kind {
            case .policy: (columns, rows) = try dumper.policy()
            case .classes: (columns, rows) = try dumper.classes()
            case .identities: (columns, rows) = dumper.identities()
            case .ipcache: (columns, rows) = try dumper.ipcache()
            case .conntrack: (columns, rows) = try dumper.conntrack()
            case .endpoints: (columns, rows) = try dumper.endpoints()
            case .counters: (columns, rows) = try dumper.counters()
            case .l7ports: (columns, rows) = try dumper.l7Ports()
            case .fqdn: (columns, rows) = try dumper.fqdn(bindingsFile: config.fqdnFile)
            }
            if output == .json { try printJSON(rows) } else { printTable(columns.map { $0.uppercased() }, rows.map { r in columns.map { r[$0] ?? "" } }) }
        }
    }
}

struct MapDumper {
    let maps: PalisadeMaps
    let state: AgentState

    var slot: UInt8 { UInt8(maps.activeConfig.active_slot & 1) }
    func name(_ id: UInt32) -> String { state.name(of: id) }
    func rule(_ id: UInt32) -> String {
        guard let r = state.rule(id) else { return id == 0 ? "-" : "#\(id)" }
        return "\(r.policy) \(r.kind == .defaultDeny ? "default" : r.action.rawValue) \(r.location.file.split(separator: "/").last ?? ""):\(r.location.line)"
    }
    func proto(_ p: UInt8) -> String { IPProtocol(rawValue: p)?.description ?? "\(p)" }

    func policy() throws -> ([String], [[String: String]]) {
        var rows: [[String: String]] = []
        for (k, v) in try maps.policy.entries() where k.generation == slot {
            let bits = Int(k.prefixlen)
            let protoText = bits <= Int(PAL_POLICY_BITS_PEER) ? "any" : proto(k.protocol)
            let portBits = bits - Int(PAL_POLICY_BITS_PROTO)
            let port = UInt16(bigEndian: k.dport)
            let portText: String
            if portBits <= 0 { portText = "any" }
            else if portBits == 16 { portText = "\(port)" }
            else { portText = "\(port)-\(UInt32(port) + (UInt32(1) << (16 - portBits)) - 1)" }
            rows.append([
                "local": name(UInt32(bigEndian: k.local_identity)),
                "direction": Direction(kernel: k.direction).rawValue,
                "peer": state.peerName(of: UInt32(bigEndian: k.peer_class)),
                "protocol": protoText, "port": portText,
                "verdict": Verdict(rawValue: v.verdict)?.description ?? "\(v.verdict)",
                "rule": rule(v.rule_id), "packets": "\(v.packets)", "bytes": "\(v.bytes)",
            ])
        }
        for (k, v) in try maps.defaults.entries() where k.generation == slot {
            rows.append(["local": name(k.local_identity), "direction": Direction(kernel: k.direction).rawValue, "peer": "(default)",
                         "protocol": "any", "port": "any", "verdict": Verdict(rawValue: v.verdict)?.description ?? "?",
                         "rule": rule(v.rule_id), "packets": "", "bytes": ""])
        }
        rows.sort { ($0["local"]!, $0["direction"]!, $0["peer"]!, $0["protocol"]!, $0["port"]!) < ($1["local"]!, $1["direction"]!, $1["peer"]!, $1["protocol"]!, $1["port"]!) }
        return (["local", "direction", "peer", "protocol", "port", "verdict", "rule", "packets", "bytes"], rows)
    }

    /// Peer classes: what each stands for and which identities are in it.
    func classes() throws -> ([String], [[String: String]]) {
        var members: [UInt32: [UInt32]] = [:]
        for (k, c) in try maps.peerClasses.entries() where k.generation == slot { members[c, default: []].append(k.identity) }
        let rows = members.sorted { $0.key < $1.key }.map { c, ids -> [String: String] in
            let sorted = ids.sorted()
            return ["class": "\(c)", "selectors": (state.peerClasses[c] ?? ["?"]).joined(separator: " & "), "identities": "\(ids.count)",
                    "members": sorted.prefix(3).map { name($0) }.joined(separator: ", ") + (ids.count > 3 ? ", ..." : "")]
        }
        return (["class", "selectors", "identities", "members"], rows)
    }

    func identities() -> ([String], [[String: String]]) {
        var rows: [[String: String]] = [
            ["identity": "1", "name": "reserved:host", "namespace": "", "labels": ""],
            ["identity": "2", "name": "reserved:world", "namespace": "", "labels": ""],
            ["identity": "3", "name": "reserved:unknown", "namespace": "", "labels": ""],
        ]
        for (id, r) in state.identities.sorted(by: { $0.key < $1.key }) {
            rows.append(["identity": "\(id)", "name": r.spiffeID.description, "namespace": r.namespace,
                         "labels": r.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")])
        }
        for (c, id) in state.cidrIdentities.sorted(by: { $0.value < $1.value }) {
            rows.append(["identity": "\(id)", "name": "cidr:\(c)", "namespace": "", "labels": ""])
        }
        return (["identity", "name", "namespace", "labels"], rows)
    }

    /// Ports whose connections go through an agent's HTTP proxy.
    func l7Ports() throws -> ([String], [[String: String]]) {
        let rows = try maps.l7Ports.keys().map { k -> [String: String] in
            let port = UInt16(bigEndian: k.port)
            return ["workload": name(k.identity), "identity": "\(k.identity)", "port": port == 0 ? "any" : "\(port)", "protocol": proto(k.protocol)]
        }
        return (["workload", "identity", "port", "protocol"], rows.sorted { ($0["workload"]!, $0["port"]!) < ($1["workload"]!, $1["port"]!) })
    }

    func ipcache() throws -> ([String], [[String: String]]) {
        var rows: [[String: String]] = []
        for (k, v) in try maps.ipcache.entries() where k.generation == slot {
            let cidr = CIDR(address: IPAddress(tuple: k.addr), mappedPrefixLength: Int(k.prefixlen) - Int(PAL_IPCACHE_BITS_GENERATION))
            rows.append(["prefix": cidr.description, "identity": "\(v.identity)", "name": name(v.identity),
                         "cidr-identity": v.cidr_identity == 0 ? "-" : name(v.cidr_identity),
                         "fqdn": v.fqdn_class == 0 ? "-" : name(v.fqdn_class),
                         "class": NumericIdentity(v.identity).isWorkload ? (v.peer_class == 0 ? "-" : "\(v.peer_class)") : "-",
                         "remote": v.flags & UInt32(PAL_IPCACHE_REMOTE_WORKLOAD) != 0 ? "tunnel" : "-"])
        }
        return (["prefix", "identity", "name", "cidr-identity", "fqdn", "class", "remote"], rows.sorted { $0["prefix"]! < $1["prefix"]! })
    }

    /// Names DNS answered (the agent's STATE/fqdn.json), each address with
    /// the TTL left (negative: in its grace period) and the FQDN class the
    /// kernel holds for it now, by the selectors it stands for.
    func fqdn(bindingsFile: String) throws -> ([String], [[String: String]]) {
        var inKernel: [IPAddress: UInt32] = [:]
        for (k, v) in try maps.ipcache.entries() where k.generation == slot && v.fqdn_class != 0 {
            inKernel[IPAddress(tuple: k.addr)] = v.fqdn_class
        }
        let now = Date()
        let rows = FQDNEgress.load(bindingsFile).map { b -> [String: String] in
            let cls = inKernel[b.address]
            return ["name": b.name, "address": b.address.description, "ttl-left": "\(Int(b.expires.timeIntervalSince(now).rounded()))s",
                    "selectors": cls.map { state.fqdnClasses?[$0]?.joined(separator: " | ") ?? "class \($0)" } ?? "- (not in the kernel)"]
        }
        return (["name", "address", "ttl-left", "selectors"], rows)
    }

    func conntrack() throws -> ([String], [[String: String]]) {
        var rows: [[String: String]] = []
        for (k, v) in try maps.conntrack.entries() {
            let flow = ConntrackFlow(k, v)
            rows.append([
                "endpoint": name(v.local_identity),
                "direction": Direction(kernel: v.direction).rawValue,
                "source": "\(flow.initiator):\(flow.initiatorPort)",
                "destination": "\(flow.responder):\(flow.responderPort)",
                "protocol": proto(k.protocol), "peer": name(v.peer_identity),
                "packets": "\(v.packets)", "bytes": "\(v.bytes)",
                "reply": v.flags & UInt8(PAL_CT_REVOKED) != 0 ? "revoked" : v.flags & UInt8(PAL_CT_SEEN_REPLY) != 0 ? "yes" : "no",
                "rule": rule(v.rule_id),
            ])
        }
        return (["endpoint", "direction", "source", "destination", "protocol", "peer", "packets", "bytes", "reply", "rule"],
                rows.sorted { ($0["endpoint"]!, $0["source"]!) < ($1["endpoint"]!, $1["source"]!) })
    }

    func endpoints() throws -> ([String], [[String: String]]) {
        var rows: [[String: String]] = []
        for (k, v) in try maps.endpointsByIfindex.entries() {
            let rec = state.endpoints.first { $0.ifindex == Int32(k) }
            rows.append(["kind": "pod", "key": "ifindex \(k)", "workload": rec?.workload ?? "?", "interface": rec?.interface ?? "",
                         "identity": "\(v.identity)", "name": name(v.identity)])
        }
        for (k, v) in try maps.endpointsByCgroup.entries() {
            let rec = state.endpoints.first { $0.cgroupID == k }
            rows.append(["kind": "cgroup", "key": "cgroup \(k)", "workload": rec?.workload ?? "?", "interface": rec?.cgroupPath ?? "",
                         "identity": "\(v.identity)", "name": name(v.identity)])
        }
        return (["kind", "key", "workload", "interface", "identity", "name"], rows.sorted { $0["workload"]! < $1["workload"]! })
    }

    func counters() throws -> ([String], [[String: String]]) {
        let totals = try maps.counterTotals()
        var rows: [[String: String]] = []
        for d in Direction.allCases {
            for r in Reason.allCases {
                let c = totals[Int(d.kernel)][Int(r.rawValue)]
                rows.append(["direction": d.rawValue, "reason": r.description, "packets": "\(c.packets)", "bytes": "\(c.bytes)"])
            }
        }
        let ev = try maps.eventTotals()
        rows.append(["direction": "-", "reason": "events-suppressed", "packets": "\(ev.suppressed)", "bytes": ""])
        rows.append(["direction": "-", "reason": "events-lost", "packets": "\(ev.lost)", "bytes": ""])
        return (["direction", "reason", "packets", "bytes"], rows)
    }
}
