import ArgumentParser
import CPalisadeShared
import Foundation
import PalisadeBPF
import PalisadeCA
import PalisadeDatapath
import PalisadeAgent
import PalisadeIdentity
import PalisadePolicy

/// Enrollment writes a file into the agent's workload directory; the agent
/// picks it up on its next pass (the same path GitOps tooling would use).
struct WorkloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "workload", abstract: "Enroll, remove and list workloads.",
                                                    subcommands: [Enroll.self, Remove.self, List.self])

    struct Enroll: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Enroll a pod-like (--interface) or cgroup (--cgroup) workload.")
        @OptionGroup var options: ConfigOption
        @Option(help: "Workload name (lowercase letters, digits, '-').") var name: String
        @Option(name: .customLong("spiffe-id"), help: "spiffe://TRUST-DOMAIN/PATH") var spiffeID: String
        @Option(help: "Namespace (for Kubernetes-style selection).") var namespace = "default"
        @Option(name: .customLong("label"), help: "KEY=VALUE, repeatable.") var labels: [String] = []
        @Option(name: .customLong("namespace-label"), help: "KEY=VALUE label of the workload's namespace, repeatable.") var namespaceLabels: [String] = []
        @Option(name: .customLong("address"), help: "The workload's IP, repeatable.") var addresses: [String] = []
        @Option(help: "Host side of the pod's veth.") var interface: String?
        @Option(help: "cgroup path, relative to the cgroup2 mount or absolute (with --interface: the pod's cgroup, for socket redirection).") var cgroup: String?
        @Option(help: "Mutual TLS mode: strict, permissive or disabled.") var mtls: String?
        @Option(name: .customLong("port"), help: "A named port NAME=PORT[/tcp|udp] (e.g. http=8080/tcp), repeatable.") var ports: [String] = []

        /// KEY=VALUE arguments as a YAML mapping under `key` ("" when none).
        func yamlMap(_ key: String, _ pairs: [String], flag: String) throws -> String {
            guard !pairs.isEmpty else { return "" }
            var out = "\(key):\n"
            for p in pairs {
                let kv = p.split(separator: "=", maxSplits: 1)
                guard kv.count == 2 else { throw CLIError("\(flag) \(p): expected KEY=VALUE") }
                out += "  \(kv[0]): \"\(kv[1])\"\n"
            }
            return out
        }

        func run() throws {
            let config = try options.load()
            var yaml = "name: \(name)\nspiffeID: \(spiffeID)\nnamespace: \(namespace)\n"
            yaml += try yamlMap("labels", labels, flag: "--label")
            yaml += try yamlMap("namespaceLabels", namespaceLabels, flag: "--namespace-label")
            if !addresses.isEmpty { yaml += "addresses: [\(addresses.map { "\"\($0)\"" }.joined(separator: ", "))]\n" }
            if let interface { yaml += "interface: \(interface)\n" }
            if let cgroup { yaml += "cgroup: \(cgroup)\n" }
            if let mtls { yaml += "mtls: \(mtls)\n" }
            if !ports.isEmpty { yaml += "ports: [\(ports.map { "\"\($0)\"" }.joined(separator: ", "))]\n" }
            let path = "\(config.resolvedWorkloadDir)/\(name).yaml"
            // Validate exactly as the agent will, before writing anything.
            do { _ = try Workload.parse(yaml, file: path, trustDomain: config.trustDomain) } catch { throw CLIError("\(error)") }
            try FileManager.default.createDirectory(atPath: config.resolvedWorkloadDir, withIntermediateDirectories: true)
            try yaml.write(toFile: path, atomically: true, encoding: .utf8)
            print("enrolled \(name) as \(spiffeID) (\(path))")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove an enrolled workload.")
        @OptionGroup var options: ConfigOption
        @Argument var name: String
        func run() throws {
            let config = try options.load()
            let path = "\(config.resolvedWorkloadDir)/\(name).yaml"
            guard FileManager.default.fileExists(atPath: path) else { throw CLIError("no workload file \(path)") }
            try FileManager.default.removeItem(atPath: path)
            print("removed \(name)")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Enrolled workloads and where they are attached.")
        @OptionGroup var options: ConfigOption
        @Option var output: OutputFormat = .table
        func run() throws {
            let config = try options.load()
            let state = AgentState.load(config.stateFile) ?? AgentState()
            if output == .json { try printJSON(state.endpoints); return }
            printTable(["WORKLOAD", "IDENTITY", "SPIFFE ID", "ATTACHED TO"], state.endpoints.map { e in
                [e.workload, "\(e.identity)", state.name(of: e.identity.rawValue),
                 e.interface.map { "veth \($0) (ifindex \(e.ifindex ?? 0))" } ?? "cgroup \(e.cgroupPath ?? "")"]
            })
            for err in state.workloadErrors { FileHandle.standardError.write(Data("error: \(err)\n".utf8)) }
        }
    }
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status",
        abstract: "Datapath, attachments, map fill, policy and workloads; non-zero exit when unhealthy (usable as a probe).",
        discussion: "Run it in the agent's network namespace: tc attachments are looked up by interface index.")
    @OptionGroup var options: ConfigOption

    func run() throws {
        let config = try options.load()
        var problems: [String] = []
        let state = AgentState.load(config.stateFile)
        guard let maps = try? PalisadeMaps.openPinned(at: config.bpffs) else {
            print("datapath:   NOT LOADED (no pinned maps at \(config.bpffs))")
            throw ExitCode(1)
        }
        let cfg = maps.activeConfig
        print("datapath:   maps pinned at \(config.bpffs), policy generation \(cfg.generation) (slot \(cfg.active_slot))")
        let fill: [(String, Int?, Int)] = [
            ("policy", try? maps.policy.keys().count, Int(PAL_MAX_POLICY)),
            ("ipcache", try? maps.ipcache.keys().count, Int(PAL_MAX_IPCACHE)),
            ("defaults", try? maps.defaults.keys().count, Int(PAL_MAX_DEFAULTS)),
            ("peer-class", try? maps.peerClasses.keys().count, Int(PAL_MAX_PEER_CLASS)),
            ("conntrack", try? maps.conntrack.entries().count, Int(PAL_MAX_CONNTRACK)),
            ("endpoints", (try? maps.endpointsByIfindex.keys().count).map { $0 + ((try? maps.endpointsByCgroup.keys().count) ?? 0) }, 2 * Int(PAL_MAX_ENDPOINTS)),
        ]
        print("maps:       " + fill.map { name, n, cap in "\(name) \(n.map(String.init) ?? "?")/\(cap) (\(n.map { String(format: "%.1f%%", 100.0 * Double($0) / Double(cap)) } ?? "?"))" }.joined(separator: ", "))
        guard let state else {
            print("agent:      no state at \(config.stateFile)")
            throw ExitCode(1)
        }
        for e in state.endpoints {
            if let ifindex = e.ifindex {
                let ing = (try? TC.attachedProgramID(ifindex: ifindex, hook: .ingress)) ?? nil
                let eg = (try? TC.attachedProgramID(ifindex: ifindex, hook: .egress)) ?? nil
                let ok = ing != nil && eg != nil
                if !ok { problems.append("workload \(e.workload): tc programs missing on \(e.interface ?? "?")") }
                print("workload:   \(e.workload) [\(state.name(of: e.identity.rawValue))] veth \(e.interface ?? "?") tc ingress prog \(ing.map(String.init) ?? "MISSING"), egress prog \(eg.map(String.init) ?? "MISSING")")
            } else if let cg = e.cgroupID {
                let pins = ["ingress", "egress"].map { FileManager.default.fileExists(atPath: "\(config.bpffs)/links/cgroup-\(cg)-\($0)") }
                if pins.contains(false) { problems.append("workload \(e.workload): cgroup link missing") }
                print("workload:   \(e.workload) [\(state.name(of: e.identity.rawValue))] cgroup \(e.cgroupPath ?? "?") links \(pins.allSatisfy { $0 } ? "pinned" : "MISSING")")
            }
        }
        for err in state.workloadErrors { problems.append(err) }
        print("policy:     generation \(state.policy.generation), \(state.policy.policies) policies, \(state.policy.policyEntries) entries, last apply \(Int(state.policy.applySeconds * 1000)) ms")
        let svids = SVIDStore.list(directory: config.svidDir)
        if let soonest = svids.min(by: { $0.notAfter < $1.notAfter }) {
            let left = Int(soonest.notAfter.timeIntervalSinceNow)
            print("certs:      \(svids.count) SVIDs, soonest expiry in \(left / 60)m (\(soonest.spiffeID))")
            if left <= 0 { problems.append("certificate of \(soonest.spiffeID) has expired") }
        } else {
            print("certs:      none issued yet")
        }
        if let f = state.files {
            print("files:      \(f.open) of \(f.limit) descriptors open")
            if f.limit > 0, f.open * 10 > f.limit * 9 { problems.append("file descriptors nearly exhausted: \(f.open) of \(f.limit)") }
        }
        if let e = state.policy.lastError { problems.append("policy: \(e)") }
        if let why = state.policy.notInstalled {
            print("policy:     NOT INSTALLED, the previous policy stays: \(why)")
            if state.policy.lastError == nil { problems.append("policy not installed: \(why)") }
        }
        if let locked = state.policy.lockedDown, !locked.isEmpty {
            print("policy:     locked down (default deny until their policy is installed): \(locked.joined(separator: ", "))")
            problems.append("\(locked.count) workloads locked down")
        }
        if let st = state.store {
            print("store:      \(st.connected ? "connected" : "UNREACHABLE (enforcing the last known state)"), revision \(st.revision), \(st.peers) other nodes")
            if !st.connected { problems.append("store unreachable: \(st.lastError ?? "?")") }
        }
        if let i = state.issuer {
            let ago = i.lastContact.map { "last answer \(Int(-$0.timeIntervalSinceNow)) s ago" } ?? "never answered"
            print("issuer:     \(i.address) \(i.reachable ? "reachable" : "UNREACHABLE (SVIDs in hand stay in use until they expire)"), \(ago)")
            if !i.reachable { problems.append("issuer unreachable: \(i.lastError ?? "?")") }
            for (id, why) in i.refused.sorted(by: { $0.key < $1.key }) { problems.append("issuer refused \(id): \(why)") }
        }
        if let redirects = state.endpoints.filter({ $0.redirectCgroupID != nil }).map(\.workload) as [String]?, !redirects.isEmpty {
            print("mesh:       redirected to the tunnel: \(redirects.joined(separator: ", "))")
        }
        for p in problems { print("problem:    \(p)") }
        print(problems.isEmpty ? "healthy" : "UNHEALTHY")
        if !problems.isEmpty { throw ExitCode(1) }
    }
}
