import Glibc

/// Returns the pages of code and read-only data that only start-up and
/// policy compiles touched: once faulted in, they stay counted in RSS,
/// while the data path under load references a small part of them.
/// Unmapping them (MADV_DONTNEED) leaves them in the page cache; what is
/// used again comes back as a minor fault.
///
/// Only mappings that cannot hold the process's own data are released:
/// file-backed, not writable, and without anonymous (copy-on-write) pages.
/// A RELRO segment (relocated, then made read-only) has anonymous pages and
/// is skipped: dropping it would bring back the file's unrelocated bytes.
/// What this does not change: the page cache stays charged to the agent's
/// cgroup (as reclaimable file memory) until the kernel needs it.
///
/// An address range read from smaps must still be that file's mapping when
/// madvise runs (the same range reused for heap memory would be zeroed):
/// the agent maps its binary and libraries once, libbpf maps the BPF
/// objects only while the datapath loads (before the first release, on the
/// same thread), and nothing else maps or unmaps a file (no dlclose; state
/// and policy files are read).
public enum CodePages {
    public struct Mapping: Equatable, Sendable {
        public var start: UInt
        public var end: UInt
        public var permissions: String
        public var path: String
        public var anonymousKB: Int
        public var rssKB: Int
        /// A shared file's clean pages: safe to drop and fault back in.
        public var isReleasable: Bool {
            path.hasPrefix("/") && permissions.count == 4 && !permissions.contains("w") && permissions.hasSuffix("p")
                && anonymousKB == 0 && rssKB > 0
        }
    }

    /// The process's mappings as /proc/self/smaps lists them.
    public static func mappings(smaps: String) -> [Mapping] {
        var out: [Mapping] = []
        for line in smaps.split(separator: "\n", omittingEmptySubsequences: true) {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if let first = fields.first, let dash = first.firstIndex(of: "-"), !first.hasSuffix(":"),
               let start = UInt(first[..<dash], radix: 16), let end = UInt(first[first.index(after: dash)...], radix: 16), fields.count >= 5 {
                out.append(Mapping(start: start, end: end, permissions: String(fields[1]),
                                   path: fields.count >= 6 ? fields[5...].joined(separator: " ") : "", anonymousKB: 0, rssKB: 0))
            } else if fields.count >= 2, !out.isEmpty, let kb = Int(fields[1]) {
                switch fields[0] {
                case "Rss:": out[out.count - 1].rssKB = kb
                case "Anonymous:": out[out.count - 1].anonymousKB = kb
                default: break
                }
            }
        }
        return out
    }

    /// Releases the releasable mappings; returns the resident KB they held.
    @discardableResult
    public static func release() -> Int {
        guard let smaps = readAll("/proc/self/smaps") else { return 0 }
        var released = 0
        for m in mappings(smaps: smaps) where m.isReleasable {
            if madvise(UnsafeMutableRawPointer(bitPattern: m.start), Int(m.end - m.start), MADV_DONTNEED) == 0 {
                released += m.rssKB
            }
        }
        return released
    }

    /// Read to the end: Foundation reads a /proc file (size 0) with one
    /// read, which returns smaps cut after its first page.
    static func readAll(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes.append(contentsOf: chunk[..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
