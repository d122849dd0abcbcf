import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadeStore
import PalisadePolicy

/// Reads policy files given on the command line.
func readPolicyFiles(_ files: [String]) throws -> [(name: String, text: String)] {
    try files.map { f in
        guard let text = try? String(contentsOfFile: f, encoding: .utf8) else { throw CLIError("\(f): cannot read file") }
        return (f, text)
    }
}

/// Runs body; policy errors are printed one per line and exit 1.
func reportingPolicyErrors(_ body: () throws -> Void) throws {
    do { try body() } catch let e as PolicyLoadErrors {
        for err in e.errors { FileHandle.standardError.write(Data("\(err)\n".utf8)) }
        throw ExitCode(1)
    }
}

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy", abstract: "Validate and inspect policies.",
        subcommands: [Validate.self, Apply.self, Status.self, Explain.self, Convert.self])

    /// Validates the files together with the policies already in force, then
    /// places them in the agent's policy directory (write + rename, so the
    /// agent never reads half a file). Nothing is copied if anything fails.
    struct Apply: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Validate policy files and hand them to the agent (Palisade or Kubernetes format).")
        @OptionGroup var options: ConfigOption
        @Flag(help: "Write them to the shared store (etcd): enforced on every node.") var store = false
        @Argument(help: "Policy files (YAML).") var files: [String]

        func run() throws {
            let config = try options.load()
            if store { return try applyToStore(config) }
            let dir = config.resolvedPolicyDir
            let incoming = try readPolicyFiles(files)
            let targets = incoming.map { "\(dir)/\(($0.name as NSString).lastPathComponent)" }
            guard Set(targets).count == targets.count else { throw CLIError("two files share a name; the policy directory holds files by name") }
            // The set the agent will see: existing files, minus the ones being replaced, plus the new ones.
            let existing = readYAMLDirectory(dir).filter { !targets.contains($0.name) }
            try reportingPolicyErrors {
                let set = try PolicySet.load(existing + incoming)
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                for (f, target) in zip(incoming, targets) {
                    let tmp = "\(dir)/.\((target as NSString).lastPathComponent).tmp"
                    try f.text.write(toFile: tmp, atomically: false, encoding: .utf8)
                    guard rename(tmp, target) == 0 else { throw CLIError("cannot place \(target): \(String(cString: strerror(errno)))") }
                }
                print("applied \(files.count) \(files.count == 1 ? "file" : "files"); \(set.policies.count) policies in force once the agent picks them up (palisade policy status)")
            }
        }
    }

    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print policies (Kubernetes NetworkPolicy or Palisade's) in Palisade's format.")
        @Argument(help: "Policy files (YAML).") var files: [String]

        func run() throws {
            let inputs = try readPolicyFiles(files)
            try reportingPolicyErrors { print(PolicyWriter.yaml(try PolicySet.load(inputs).policies), terminator: "") }
        }
    }

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Check policy files; non-zero exit with precise errors if any is bad.")
        @Argument(help: "Policy files (YAML).") var files: [String]

        func run() throws {
            let inputs = try readPolicyFiles(files)
            try reportingPolicyErrors {
                let set = try PolicySet.load(inputs)
                print("ok: \(set.policies.count) \(set.policies.count == 1 ? "policy" : "policies") in \(files.count) \(files.count == 1 ? "file" : "files")")
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The policy generation in force and the last error, if any.")
        @OptionGroup var options: ConfigOption
        @Option var output: OutputFormat = .table

        func run() throws {
            let config = try options.load()
            guard let state = AgentState.load(config.stateFile) else { throw CLIError("no agent state at \(config.stateFile)") }
            if output == .json { try printJSON(state.policy); return }
            let p = state.policy
            print("generation:   \(p.generation)")
            print("applied at:   \(p.appliedAt.map { "\($0)" } ?? "never")")
            print("policies:     \(p.policies) from \(p.files.count) files")
            print("map entries:  \(p.policyEntries) policy, \(p.peerClassEntries) peer class, \(p.defaultEntries) default")
            print("compile:      \(Int(p.compileSeconds * 1000)) ms, kernel apply \(Int(p.applySeconds * 1000)) ms")
            print("last error:   \(p.lastError ?? "none")")
            if let why = p.notInstalled { print("installed:    NO, the previous policy stays: \(why)") }
            if let locked = p.lockedDown, !locked.isEmpty { print("locked down:  \(locked.joined(separator: ", "))") }
            if p.lastError != nil || p.notInstalled != nil { throw ExitCode(1) }
        }
    }
}

extension PolicyCommand.Apply {
    /// Validates the files together with the policies already in the store,
    /// then writes each under PREFIX/policies/NAME.
    func applyToStore(_ config: AgentConfig) throws {
        guard let sc = config.store else { throw CLIError("--store needs a 'store' in the configuration") }
        let incoming = try readPolicyFiles(files)
        let names = incoming.map { (($0.name as NSString).lastPathComponent as NSString).deletingPathExtension }
        guard Set(names).count == names.count else { throw CLIError("two files share a name; the store holds policies by name") }
        let etcd = try sc.makeStore()
        let prefix = "\(sc.prefix)policies/"
        let existing = try runBlocking { try await etcd.list(prefix: prefix).kvs }
            .filter { kv in !names.contains { prefix + $0 == kv.key } }
            .map { (name: "etcd:\($0.key)", text: $0.string) }
        try reportingPolicyErrors {
            let set = try PolicySet.load(existing + incoming)
            for (f, n) in zip(incoming, names) { try runBlocking { try await etcd.put(prefix + n, f.text) } }
            print("stored \(files.count) \(files.count == 1 ? "policy file" : "policy files") under \(prefix); \(set.policies.count) policies in the store")
        }
    }
}
