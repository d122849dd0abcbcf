import Foundation
import XCTest

/// The two agents' process IDs, and what they hold (from /proc).
extension MeshTests {
    func agentPIDs(_ m: Mesh) throws -> [Int32] {
        try [m.n1, m.n2].map { a -> Int32 in
            let out = try sh(["pgrep", "-f", "agent --config \(a.configPath)$"]).output
            return try XCTUnwrap(out.split(separator: "\n").compactMap { Int32($0) }.last, "agent pid")
        }
    }
}

/// Resident memory in bytes.
@Sendable func rss(_ pid: Int32) -> Int {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
}

/// Open file descriptors, and the soft limit on them.
func fileDescriptors(_ pid: Int32) -> (open: Int, limit: Int) {
    let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? 0
    let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
    let line = limits.split(separator: "\n").first { $0.hasPrefix("Max open files") } ?? ""
    return (open, Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst(3).first ?? "") ?? 0)
}

/// The highest values seen by the sampling thread.
final class Peak: @unchecked Sendable {
    private let lock = NSLock()
    private var _values: [Int]
    private var _done = false
    init(_ v: [Int]) { _values = v }
    var values: [Int] { lock.withLock { _values } }
    var done: Bool {
        get { lock.withLock { _done } }
        set { lock.withLock { _done = newValue } }
    }
    func record(_ v: [Int]) { lock.withLock { _values = zip(_values, v).map { max($0, $1) } } }
}
