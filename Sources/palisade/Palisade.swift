import ArgumentParser
import Foundation
import PalisadeIdentity
import Logging
import PalisadeAgent

@main
struct Palisade: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "palisade",
        abstract: "Zero-trust enforcement agent: identity-based microsegmentation in eBPF.",
        subcommands: [AgentCommand.self, PolicyCommand.self, MapsCommand.self, WorkloadCommand.self, FlowsCommand.self, RequestsCommand.self, GraphCommand.self, CertsCommand.self, CACommand.self, StoreCommand.self, JWTCommand.self, StatusCommand.self])
}

/// --config, shared by every subcommand. Without it: $PALISADE_CONFIG, then
/// /etc/palisade/agent.yaml if present, then the embedded default.
struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "Agent configuration file (YAML).")
    var config: String?

    func load() throws -> AgentConfig {
        let path = config ?? ProcessInfo.processInfo.environment["PALISADE_CONFIG"]
            ?? (FileManager.default.fileExists(atPath: "/etc/palisade/agent.yaml") ? "/etc/palisade/agent.yaml" : nil)
        do { return try AgentConfig.load(path: path) } catch { throw CLIError("\(error)") }
    }
}

struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case table, json
}

func printJSON<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    e.dateEncodingStrategy = .utc
    print(String(decoding: try e.encode(value), as: UTF8.self))
}

/// Fixed-width columns, the way operators read map dumps.
func printTable(_ header: [String], _ rows: [[String]]) {
    var widths = header.map(\.count)
    for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }
    print(line(header))
    for r in rows { print(line(r)) }
}

/// SIGTERM/SIGINT set a flag the agent loop checks.
nonisolated(unsafe) var stopRequested: sig_atomic_t = 0

struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the node agent in the foreground.",
        discussion: "On SIGTERM it exits and leaves programs and maps pinned, so enforcement continues while it is down; on start it adopts them.")

    @OptionGroup var options: ConfigOption
    @Flag(help: "Remove every program, link and pinned map this agent installed, then exit.")
    var cleanup = false
    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func run() throws {
        let config = try options.load()
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var log = Logger(label: "palisade.agent")
        log.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        if cleanup {
            Agent.cleanup(config: config, logger: log)
            return
        }
        signal(SIGTERM) { _ in stopRequested = 1 }
        signal(SIGINT) { _ in stopRequested = 1 }
        signal(SIGPIPE, SIG_IGN)
        let agent: Agent
        do { agent = try Agent(config: config, logger: log) } catch {
            log.critical("agent cannot start", metadata: ["error": "\(error)"])
            throw ExitCode(1)
        }
        log.info("agent running", metadata: ["state": "\(config.stateDir)", "policies": "\(config.resolvedPolicyDir)",
                                             "workloads": "\(config.resolvedWorkloadDir)"])
        agent.run { stopRequested != 0 }
    }
}
