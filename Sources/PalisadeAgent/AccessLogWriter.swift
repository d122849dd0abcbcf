import Dispatch
import Foundation
import PalisadeL7
import PalisadeMetrics
import PalisadeTunnel

/// Writes access-log lines off the event loops. The proxy only appends a
/// line to a buffer under a lock; one writer on its own queue takes all the
/// lines queued in the last `batchDelay` (20 ms) and writes them in one
/// call, so a line is on disk within that: neither a write nor a thread
/// wake-up per request (either costs a busy proxy several percent of its
/// CPU). If the disk falls behind by more than `maxPending` bytes, lines
/// are dropped and counted, never buffered without bound. At `rotateAt`
/// bytes the file becomes PATH.1 (the previous .1 is dropped) and a new one
/// starts, as the flow event log does.
final class AccessLogWriter: @unchecked Sendable {
    private let lock = NSLock()
    private var pending: [UInt8] = []
    private var draining = false
    private var dropped = 0
    private var fd: Int32
    private let path: String
    private var size: Int
    let rotateAt: Int
    private let queue = DispatchQueue(label: "palisade.access-log")
    static let batchDelay = DispatchTimeInterval.milliseconds(20)
    let maxPending: Int
    var onDrop: (@Sendable (Int) -> Void)?

    /// Opens (creating it 0600) the log file for appending; nil if it cannot.
    init?(path: String, maxPending: Int = 16 << 20, rotateAt: Int = 64 << 20) {
        guard let fd = Self.open(path) else { return nil }
        self.fd = fd
        self.path = path
        self.maxPending = maxPending
        self.rotateAt = rotateAt
        var st = stat()
        size = fstat(fd, &st) == 0 ? Int(st.st_size) : 0
    }

    private static func open(_ path: String) -> Int32? {
        let fd = Foundation.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        return fd >= 0 ? fd : nil
    }

    private func rotateIfFull() {
        guard size >= rotateAt else { return }
        _ = rename(path, path + ".1")
        guard let next = Self.open(path) else { return }   // keep writing to the renamed file
        close(fd)
        fd = next
        size = 0
    }

    deinit { close(fd) }

    func write(_ entry: AccessLogEntry) {
        var line: [UInt8] = []
        write(entry, formattingIn: &line)
    }

    /// Formatted outside the lock (several event loops log at once), in
    /// the caller's buffer (a connection reuses its own); under the lock
    /// only a copy.
    func write(_ entry: AccessLogEntry, formattingIn line: inout [UInt8]) {
        line.removeAll(keepingCapacity: true)
        entry.appendJSONLine(to: &line)
        let schedule: Bool = lock.withLock {
            if pending.count + line.count > maxPending {
                dropped += 1
                return false
            }
            pending.append(contentsOf: line)
            if draining { return false }
            draining = true
            return true
        }
        if schedule { queue.asyncAfter(deadline: .now() + Self.batchDelay) { self.drain() } }
    }

    /// Blocks until every line written so far is on disk (shutdown, tests).
    func flush() { queue.sync { self.drain() } }

    /// The buffer handed back to the proxy at each drain, emptied but with
    /// its capacity kept (only the writer's queue touches it).
    private var spare: [UInt8] = []

    private func drain() {
        while true {
            var batch = spare
            spare = []
            let lost: Int = lock.withLock {
                swap(&batch, &pending)
                let d = dropped
                dropped = 0
                if batch.isEmpty { draining = false }
                return d
            }
            if lost > 0 { onDrop?(lost) }
            if batch.isEmpty {
                spare = batch
                return
            }
            batch.withUnsafeBytes { buf in
                var off = 0
                while off < buf.count {
                    let n = Foundation.write(fd, buf.baseAddress! + off, buf.count - off)
                    if n < 0 { if errno == EINTR { continue }; break }   // disk error: the batch is lost
                    off += n
                }
                size += off
            }
            rotateIfFull()
            // (A burst's large buffer is not kept.)
            if batch.capacity <= 1 << 20 {
                batch.removeAll(keepingCapacity: true)
                spare = batch
            }
        }
    }
}

/// What one proxied connection's finished requests go to: its metric
/// series (looked up once, see `AgentMetrics.httpConnection`) and the
/// access log, formatted in a line buffer it keeps. Not thread-safe: a
/// connection records on its own event loop only.
final class HTTPRequestRecorder: @unchecked Sendable {
    let metrics: HTTPConnectionMetrics
    let writer: AccessLogWriter?
    let sampling: Double
    private var line: [UInt8] = []

    init(metrics: HTTPConnectionMetrics, writer: AccessLogWriter?, sampling: Double) {
        self.metrics = metrics; self.writer = writer; self.sampling = sampling
    }

    func record(_ entry: AccessLogEntry) {
        metrics.record(status: entry.status, decision: entry.decision, seconds: entry.durationMs / 1000)
        if sampling < 1, Double.random(in: 0..<1) >= sampling { return }
        writer?.write(entry, formattingIn: &line)
    }
}
