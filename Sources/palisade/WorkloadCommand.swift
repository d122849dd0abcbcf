import ArgumentParser
import Foundation
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
        @Option(help: "cgroup path, relative to the cgroup2 mount or absolute.") var cgroup: String?

        func run() throws {
            let config = try options.load()
            var yaml = "name: \(name)\nspiffeID: \(spiffeID)\nnamespace: \(namespace)\n"
            if !labels.isEmpty {
                yaml += "labels:\n"
                for l in labels {
                    let kv = l.split(separator: "=", maxSplits: 1)
                    guard kv.count == 2 else { throw CLIError("--label \(l): expected KEY=VALUE") }
                    yaml += "  \(kv[0]): \"\(kv[1])\"\n"
                }
            }
            if !namespaceLabels.isEmpty {
                yaml += "namespaceLabels:\n"
                for l in namespaceLabels {
                    let kv = l.split(separator: "=", maxSplits: 1)
                    guard kv.count == 2 else { throw CLIError("--namespace-label \(l): expected KEY=VALUE") }
                    yaml += "  \(kv[0]): \"\(kv[1])\"\n"
                }
            }
            if !addresses.isEmpty { yaml += "addresses: [\(addresses.map { "\"\($0)\"" }.joined(separator: ", "))]\n" }
            if let interface { yaml += "interface: \(interface)\n" }
            if let cgroup { yaml += "cgroup: \(cgroup)\n" }
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
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Datapath and policy state; non-zero exit when unhealthy.")
    @OptionGroup var options: ConfigOption

    func run() throws {
        let config = try options.load()
        var healthy = true
        let state = AgentState.load(config.stateFile)
        if let maps = try? PalisadeDatapathStatus.open(config.bpffs) {
            print("datapath:     maps pinned at \(config.bpffs), generation \(maps.generation), active slot \(maps.slot)")
        } else {
            print("datapath:     NOT LOADED (no pinned maps at \(config.bpffs))")
            healthy = false
        }
        if let state {
            print("workloads:    \(state.endpoints.count) attached, \(state.workloadErrors.count) rejected")
            print("policy:       generation \(state.policy.generation), \(state.policy.policies) policies, \(state.policy.policyEntries) map entries")
            if let e = state.policy.lastError { print("policy error: \(e)"); healthy = false }
            if !state.workloadErrors.isEmpty { healthy = false }
        } else {
            print("agent state:  none at \(config.stateFile)")
            healthy = false
        }
        if !healthy { throw ExitCode(1) }
    }
}

import PalisadeDatapath
enum PalisadeDatapathStatus {
    static func open(_ pinRoot: String) throws -> (generation: UInt64, slot: UInt32) {
        let m = try PalisadeMaps.openPinned(at: pinRoot)
        let c = m.activeConfig
        return (c.generation, c.active_slot)
    }
}
