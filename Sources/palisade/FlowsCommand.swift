import ArgumentParser
import Foundation
import PalisadeIdentity
import PalisadeAgent
import PalisadeDatapath

/// `palisade flows`: the kernel's flow events with identities named, like
/// `hubble observe`. Recent history from the agent's event log; --follow
/// streams live from the agent's local socket. Events the kernel's rate
/// limit suppressed, or the ring buffer lost, are counted and shown.
struct FlowsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "flows", abstract: "Show flow events (denied, audit, and allowed when enabled).")
    @OptionGroup var options: ConfigOption
    @Flag(help: "Stream new events until interrupted.") var follow = false
    @Option(help: "denied, allowed or audit.") var verdict: String?
    @Option(help: "Only flows whose local or peer identity contains this (SPIFFE ID or number).") var identity: String?
    @Option(help: "How many recent events to show.") var last = 50
    @Option var output: OutputFormat = .table

    func matches(_ e: FlowEvent) -> Bool {
        if let v = verdict, e.verdict != v { return false }
        if let id = identity, !(e.local.contains(id) || e.peer.contains(id) || "\(e.localIdentity)" == id || "\(e.peerIdentity)" == id) { return false }
        return true
    }

    func show(_ e: FlowEvent) throws {
        if output == .json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.sortedKeys]
            enc.dateEncodingStrategy = .utc
            print(String(decoding: try enc.encode(e), as: UTF8.self))
        } else {
            let t = ISO8601DateFormatter().string(from: e.time)
            let arrow = "\(e.source):\(e.sourcePort) -> \(e.destination):\(e.destinationPort)"
            let answer = (e.dnsAnswer ?? []).joined(separator: ",")
            let dns = e.dnsName.map { "  dns \($0) -> \(answer.isEmpty ? "-" : answer)" } ?? ""
            print("\(t)  \(e.verdict.uppercased().padding(toLength: 7, withPad: " ", startingAt: 0))  \(e.direction.padding(toLength: 7, withPad: " ", startingAt: 0))  \(e.proto)  \(arrow)  local=\(e.local) peer=\(e.peer)  \(e.reason)\(e.rule.map { "  [\($0)]" } ?? "")\(dns)")
        }
        fflush(nil)   // (every output stream: stdout is a global Swift 6 will not share)
    }

    static func decoder() -> JSONDecoder {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .utc
        return d
    }

    func run() throws {
        let config = try options.load()
        if let v = verdict, !Outcome.allCases.map(\.rawValue).contains(v) { throw CLIError("--verdict: expected denied, allowed or audit, got '\(v)'") }
        if follow { try stream(config.flowSocket) } else { try history(config) }
    }

    func history(_ config: AgentConfig) throws {
        var lines: [Substring] = []
        for path in [config.eventLog + ".1", config.eventLog] {
            if let text = try? String(contentsOfFile: path, encoding: .utf8) { lines += text.split(separator: "\n") }
        }
        let events = lines.compactMap { try? FlowsCommand.decoder().decode(FlowEvent.self, from: Data($0.utf8)) }.filter(matches)
        for e in events.suffix(last) { try show(e) }
        if let maps = try? PalisadeMaps.openPinned(at: config.bpffs), let ev = try? maps.eventTotals(), ev.suppressed + ev.lost > 0 {
            FileHandle.standardError.write(Data("note: the kernel suppressed \(ev.suppressed) events (rate limit) and lost \(ev.lost) (ring buffer full) since the maps were created\n".utf8))
        }
    }

    func stream(_ path: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw CLIError("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard path.utf8.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw CLIError("socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard rc == 0 else { throw CLIError("cannot connect to the agent at \(path): \(String(cString: strerror(errno))) (is it running?)") }
        var pending = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { throw CLIError("the agent closed the flow stream") }
            pending.append(contentsOf: buf[0..<n])
            while let nl = pending.firstIndex(of: 0x0a) {
                let line = pending[pending.startIndex..<nl]
                pending = Data(pending[(nl + 1)...])
                if let lost = try? JSONDecoder().decode([String: Int].self, from: line), let n = lost["lost"] {
                    FileHandle.standardError.write(Data("warning: \(n) events dropped for this client (it read too slowly)\n".utf8))
                    continue
                }
                if let e = try? FlowsCommand.decoder().decode(FlowEvent.self, from: line), matches(e) { try show(e) }
            }
        }
    }
}
