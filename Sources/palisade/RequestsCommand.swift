import ArgumentParser
import Foundation
import PalisadeIdentity
import PalisadeAgent
import PalisadeL7

/// `palisade requests`: the L7 proxy's access log, filtered and readable —
/// which request was denied, by which rule, for whom. Reads
/// STATE/access.jsonl (and its rotated .1); --follow keeps reading as lines
/// arrive (and across a rotation).
struct RequestsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "requests",
                                                    abstract: "Show requests judged by the L7 proxy (its access log).")
    @OptionGroup var options: ConfigOption
    @Flag(help: "Keep showing new requests until interrupted.") var follow = false
    @Option(help: "allowed or denied.") var decision: String?
    @Option(help: "Only requests whose source or destination SPIFFE ID contains this.") var identity: String?
    @Option(help: "Only this status (403) or class (4xx).") var status: String?
    @Option(help: "How many recent requests to show.") var last = 50
    @Option var output: OutputFormat = .table

    func validate() throws {
        if let d = decision, ![Outcome.allowed, .denied].map(\.rawValue).contains(d) { throw ValidationError("--decision: expected allowed or denied, got '\(d)'") }
        if let s = status, !(s.count == 3 && (Int(s) != nil || (s.hasSuffix("xx") && Int(s.prefix(1)) != nil))) {
            throw ValidationError("--status: expected a status like 403 or a class like 4xx, got '\(s)'")
        }
    }

    func matches(_ e: AccessLogEntry) -> Bool {
        if let d = decision, e.decision != d { return false }
        if let id = identity, !e.source.contains(id) && !e.destination.contains(id) { return false }
        if let s = status {
            if s.hasSuffix("xx") { if "\(e.status / 100)" != String(s.prefix(1)) { return false } } else if "\(e.status)" != s { return false }
        }
        return true
    }

    func show(_ line: Substring) {
        guard let e = try? JSONDecoder().decode(AccessLogEntry.self, from: Data(line.utf8)), matches(e) else { return }
        if output == .json {
            print(line)
        } else {
            let rule = e.rule.map { "  [\($0)]" } ?? ""
            print("\(e.time)  \(e.decision.uppercased().padding(toLength: 7, withPad: " ", startingAt: 0))  \(e.status)  \(e.method) \(e.path)  "
                  + "\(e.source) -> \(e.destination)  \(String(format: "%.1f", e.durationMs)) ms\(rule)")
        }
        fflush(nil)   // (every output stream: stdout is a global Swift 6 will not share)
    }

    func run() throws {
        let path = try options.load().accessLogPath
        var lines: [Substring] = []
        for p in [path + ".1", path] {
            if let text = try? String(contentsOfFile: p, encoding: .utf8) { lines += text.split(separator: "\n") }
        }
        if lines.isEmpty && !follow && !FileManager.default.fileExists(atPath: path) {
            throw CLIError("no access log at \(path): no request has gone through the L7 proxy (is a destination under HTTP rules?)")
        }
        let decoder = JSONDecoder()
        let matching = lines.filter { l in (try? decoder.decode(AccessLogEntry.self, from: Data(l.utf8))).map(matches) ?? false }
        for line in matching.suffix(last) { show(line) }
        if follow { try tail(path) }
    }

    /// Prints lines appended to `path` from its current end; a rotation
    /// (the file replaced or shorter) starts over on the new file.
    func tail(_ path: String) throws {
        var offset: UInt64 = 0, inode: UInt64 = 0
        var st = stat()
        if stat(path, &st) == 0 { offset = UInt64(st.st_size); inode = UInt64(st.st_ino) }
        var partial = Data()
        while true {
            usleep(200_000)
            guard stat(path, &st) == 0 else { continue }
            if UInt64(st.st_ino) != inode || UInt64(st.st_size) < offset { inode = UInt64(st.st_ino); offset = 0; partial = Data() }
            guard UInt64(st.st_size) > offset, let fh = FileHandle(forReadingAtPath: path) else { continue }
            try fh.seek(toOffset: offset)
            let data = fh.readDataToEndOfFile()
            try? fh.close()
            offset += UInt64(data.count)
            partial.append(data)
            while let nl = partial.firstIndex(of: UInt8(ascii: "\n")) {
                show(Substring(String(decoding: partial[partial.startIndex..<nl], as: UTF8.self)))
                partial.removeSubrange(partial.startIndex...nl)
            }
        }
    }
}
