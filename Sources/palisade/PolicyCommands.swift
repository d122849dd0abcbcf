import ArgumentParser
import Foundation
import PalisadeAgent
import PalisadePolicy

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy", abstract: "Validate and inspect policies.",
        subcommands: [Validate.self, Status.self, Explain.self, Convert.self])

    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print policies (Kubernetes NetworkPolicy or Palisade's) in Palisade's format.")
        @Argument(help: "Policy files (YAML).") var files: [String]

        func run() throws {
            var inputs: [(name: String, text: String)] = []
            for f in files {
                guard let text = try? String(contentsOfFile: f, encoding: .utf8) else { throw CLIError("\(f): cannot read file") }
                inputs.append((f, text))
            }
            do {
                print(PolicyWriter.yaml(try PolicySet.load(inputs).policies), terminator: "")
            } catch let e as PolicyLoadErrors {
                for err in e.errors { FileHandle.standardError.write(Data("\(err)\n".utf8)) }
                throw ExitCode(1)
            }
        }
    }

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Check policy files; non-zero exit with precise errors if any is bad.")
        @Argument(help: "Policy files (YAML).") var files: [String]

        func run() throws {
            var inputs: [(name: String, text: String)] = []
            for f in files {
                guard let text = try? String(contentsOfFile: f, encoding: .utf8) else {
                    FileHandle.standardError.write(Data("\(f): cannot read file\n".utf8))
                    throw ExitCode(1)
                }
                inputs.append((f, text))
            }
            do {
                let set = try PolicySet.load(inputs)
                print("ok: \(set.policies.count) \(set.policies.count == 1 ? "policy" : "policies") in \(files.count) \(files.count == 1 ? "file" : "files")")
            } catch let e as PolicyLoadErrors {
                for err in e.errors { FileHandle.standardError.write(Data("\(err)\n".utf8)) }
                throw ExitCode(1)
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
            print("map entries:  \(p.policyEntries)")
            print("last error:   \(p.lastError ?? "none")")
            if p.lastError != nil { throw ExitCode(1) }
        }
    }
}
